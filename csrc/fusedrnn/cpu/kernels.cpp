// Runtime choice of the SIMD level of the recurrence kernels.
#include <cstdlib>
#include <stdexcept>

#include "fusedrnn/cpu/kernels.h"

#if defined(FUSEDRNN_HAVE_AVX2)
#include <cpuid.h>
#endif

namespace fusedrnn::cpu {

namespace isa_generic { extern const KernelTable kTable; }
#if defined(FUSEDRNN_HAVE_AVX2)
namespace isa_avx2 { extern const KernelTable kTable; }
#endif
#if defined(FUSEDRNN_HAVE_AVX512)
namespace isa_avx512 { extern const KernelTable kTable; }
#endif

namespace {

struct Level {
  const KernelTable* table;
  bool (*cpu_has)();
};

bool always() { return true; }

#if defined(FUSEDRNN_HAVE_AVX2)
// Whether CPUID leaf `leaf` sets bit `bit` of ECX.
bool cpuid_ecx_bit(unsigned leaf, unsigned bit) {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(leaf, &eax, &ebx, &ecx, &edx) && ((ecx >> bit) & 1u);
}

// x86-64-v3: AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE. The last three straight from CPUID (leaf 1: F16C is
// ECX bit 29, MOVBE bit 22; leaf 0x80000001: LZCNT bit 5): Clang before 18 has no names for them in
// __builtin_cpu_supports, and refuses the build on an unknown one.
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
         __builtin_cpu_supports("bmi2") && cpuid_ecx_bit(1, 29) && cpuid_ecx_bit(1, 22) &&
         cpuid_ecx_bit(0x80000001u, 5);
}
#endif
#if defined(FUSEDRNN_HAVE_AVX512)
// x86-64-v4: v3 plus AVX-512 F, BW, CD, DQ, VL.
bool cpu_has_avx512() {
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
}
#endif

// Lowest first.
const std::vector<Level>& levels() {
  static const std::vector<Level> all = {
      {&isa_generic::kTable, &always},
#if defined(FUSEDRNN_HAVE_AVX2)
      {&isa_avx2::kTable, &cpu_has_avx2},
#endif
#if defined(FUSEDRNN_HAVE_AVX512)
      {&isa_avx512::kTable, &cpu_has_avx512},
#endif
  };
  return all;
}

const KernelTable* find_supported(const std::string& name) {
  for (const Level& level : levels())
    if (name == level.table->name && level.cpu_has()) return level.table;
  return nullptr;
}

const KernelTable* best_supported() {
  const KernelTable* best = levels().front().table;
  for (const Level& level : levels())
    if (level.cpu_has()) best = level.table;
  return best;
}

const KernelTable* initial_level() {
  if (const char* forced = std::getenv("FUSEDRNN_SIMD"))
    if (const KernelTable* table = find_supported(forced)) return table;
  return best_supported();
}

const KernelTable*& active() {
  static const KernelTable* table = initial_level();
  return table;
}

}  // namespace

std::vector<std::string> compiled_simd_levels() {
  std::vector<std::string> names;
  for (const Level& level : levels()) names.emplace_back(level.table->name);
  return names;
}

std::vector<std::string> supported_simd_levels() {
  std::vector<std::string> names;
  for (const Level& level : levels())
    if (level.cpu_has()) names.emplace_back(level.table->name);
  return names;
}

const KernelTable& active_kernels() { return *active(); }

void set_simd_level(const std::string& name) {
  const KernelTable* table = find_supported(name);
  if (!table) {
    std::string names;
    for (const std::string& n : supported_simd_levels()) names += (names.empty() ? "'" : ", '") + n + "'";
    throw std::invalid_argument("level: '" + name + "' is not supported here; expected one of " + names);
  }
  active() = table;
}

}  // namespace fusedrnn::cpu
