// A plain C API over the ExecuTorch runtime of the executorch wheel, for runtime/et_native.py (ctypes).
//
// Why native code: the Python bindings cannot pass per-load backend options, and XNNPACK's file-backed packed
// weight cache (weight_cache_enabled per load, packed_cache_path per process) needs both. It also keeps the
// ExecuTorch runtime path free of torch: tokens in and logits out are plain buffers.
//
// Built against the wheel's own headers and libraries (executorch/include, executorch/lib) by et_native.py; see
// docs/runtime.md ("ExecuTorch: packed weights in a mapped cache").

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/backend/interface.h>
#include <executorch/runtime/backend/options.h>
#include <executorch/runtime/platform/platform.h>
#include <executorch/runtime/platform/runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

namespace executorch::extension::threadpool {
// The wheel ships the library but not this header; the one member used here, declared as the library defines it.
class ThreadPool {
 public:
  size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(unsigned num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

using executorch::extension::Module;
using executorch::runtime::BackendOption;
using executorch::runtime::BackendOptions;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::LoadBackendOptionsMap;
using executorch::runtime::Span;

namespace {

constexpr const char* kXnnpack = "XnnpackBackend";
std::atomic<int> g_live_programs{0};   // loaded by this runner and not freed

struct Handle {
  std::unique_ptr<Module> module;
  BackendOptions<2> options;  // must outlive the loads that read it
  LoadBackendOptionsMap map;
};

void say(char* err, int errlen, const char* fmt, const char* what, long code) {
  if (err != nullptr && errlen > 0) {
    std::snprintf(err, errlen, fmt, what, code);
  }
}

// XNNPACK's weight cache logs every save of its index at Info level (dozens of lines per load): keep errors
// only. This replaces the PAL's log sink for the whole process, the Python bindings' loads included.
void emit_errors_only(et_timestamp_t, et_pal_log_level_t level, const char* filename, const char*, size_t line,
                        const char* message, size_t) {
  if (level == kError || level == kFatal) {
    std::fprintf(stderr, "executorch %s:%zu] %s\n", filename, line, message);
  }
}

}  // namespace

extern "C" {

void shira_et_quiet_logs() {
  executorch::runtime::register_pal(executorch::runtime::PalImpl::create(emit_errors_only, __FILE__));
}

// Whether the XNNPACK weight cache is on for loads that do not ask for it (the Python bindings' loads): the
// runtime checks it is off, so that those loads never share packed weights with a patched cache.
int shira_et_get_default_weight_cache(int* enabled) {
  executorch::runtime::runtime_init();
  BackendOption option;
  std::strncpy(option.key, "weight_cache_enabled", sizeof(option.key) - 1);
  option.value = false;
  Error e = executorch::runtime::get_option(kXnnpack, Span<BackendOption>(&option, 1));
  if (e != Error::Ok) {
    return static_cast<int>(e);
  }
  auto* value = std::get_if<bool>(&option.value);
  *enabled = value != nullptr && *value;
  return 0;
}

// Resize ExecuTorch's process-wide thread pool. Every XNNPACK runtime keeps a pointer to the pool it was created
// with, and a reset destroys that pool, so a reset while any program is loaded leaves it a dangling pointer (heap
// corruption, measured). So: nothing if the size is right; refused (returns the current size, not `threads`) while
// programs of this runner are loaded. The caller cannot see programs the Python bindings loaded; see et_native.
int shira_et_set_threads(int threads) {
  auto* pool = executorch::extension::threadpool::get_threadpool();
  int now = static_cast<int>(pool->get_thread_count());
  if (threads <= 0 || threads == now || g_live_programs.load() > 0) {
    return now;
  }
  pool->_unsafe_reset_threadpool(threads);
  return static_cast<int>(pool->get_thread_count());
}

int shira_et_threads() {
  return static_cast<int>(executorch::extension::threadpool::get_threadpool()->get_thread_count());
}

// Load `forward` of pte + ptd (both mapped read-only). cache_path: if not empty, XNNPACK packs this load's weights
// into that file through its weight cache (one cache per path, shared by the loads that name it), else on its
// heap. NULL on failure, with the reason in err.
void* shira_et_load(const char* pte, const char* ptd, const char* cache_path, char* err, int errlen) {
  executorch::runtime::runtime_init();
  auto h = std::make_unique<Handle>();
  h->module = std::make_unique<Module>(pte, ptd, Module::LoadMode::Mmap);
  bool cached = cache_path != nullptr && cache_path[0] != '\0';
  h->options.set_option("weight_cache_enabled", cached);
  if (cached) {
    h->options.set_option("packed_cache_path", cache_path);
  }
  if (h->map.set_options(kXnnpack, h->options.view()) != Error::Ok) {
    say(err, errlen, "%s: backend options refused (error %ld)", pte, -1L);
    return nullptr;
  }
  Error e = h->module->load(h->map);
  if (e != Error::Ok) {
    say(err, errlen, "%s: Module::load failed (executorch error %ld)", pte, static_cast<long>(e));
    return nullptr;
  }
  e = h->module->load_method("forward", nullptr, nullptr, &h->map);
  if (e != Error::Ok) {
    say(err, errlen, "%s: loading method forward failed (executorch error %ld)", pte, static_cast<long>(e));
    return nullptr;
  }
  g_live_programs.fetch_add(1);
  return h.release();
}

// logits_out receives n * vocab floats (the caller sizes it from the manifest; vocab is checked here).
int shira_et_forward(void* handle, const int64_t* tokens, int64_t n, int64_t start_pos, float* logits_out,
                     int64_t vocab, char* err, int errlen) {
  auto* h = static_cast<Handle*>(handle);
  std::vector<int64_t> pos(n);
  for (int64_t i = 0; i < n; ++i) {
    pos[i] = start_pos + i;
  }
  auto ids = executorch::extension::from_blob(const_cast<int64_t*>(tokens), {1, static_cast<int>(n)},
                                              executorch::aten::ScalarType::Long);
  auto at = executorch::extension::from_blob(pos.data(), {static_cast<int>(n)}, executorch::aten::ScalarType::Long);
  auto out = h->module->forward({EValue(ids), EValue(at)});
  if (!out.ok()) {
    say(err, errlen, "%s failed (executorch error %ld)", "forward", static_cast<long>(out.error()));
    return 1;
  }
  const auto& logits = out.get()[0].toTensor();
  if (logits.numel() != n * vocab) {
    say(err, errlen, "%s: logits have %ld elements, not tokens x vocab", "forward", static_cast<long>(logits.numel()));
    return 2;
  }
  std::memcpy(logits_out, logits.const_data_ptr<float>(), sizeof(float) * n * vocab);
  return 0;
}

void shira_et_free(void* handle) {
  if (handle != nullptr) {
    delete static_cast<Handle*>(handle);
    g_live_programs.fetch_sub(1);
  }
}

}  // extern "C"
