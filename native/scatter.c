// The switch kernel of runtime/scatter.py: flat[pos[i]] = vals[i], positions sorted ascending.
//
// Why native code: the positions are sorted but sparse (about 1% of a weight buffer of hundreds of MB, which on
// the packed-in-place paths is a tmpfs file mapped in 4 KiB pages), so neither the hardware prefetcher nor numpy's
// fancy assignment can hide the miss (and page walk) of every write. Prefetching the element PREFETCH writes
// ahead keeps that many misses in flight. Plain stores, no arithmetic: the result is bit-identical to numpy's,
// which runtime/scatter.py checks before it uses this library.

#include <stdint.h>

enum { PREFETCH = 64 };

void shira_scatter(float* flat, const int64_t* pos, const float* vals, int64_t n) {
  int64_t i = 0;
  for (; i + PREFETCH < n; i++) {
    __builtin_prefetch(flat + pos[i + PREFETCH], 1, 0);
    flat[pos[i]] = vals[i];
  }
  for (; i < n; i++) {
    flat[pos[i]] = vals[i];
  }
}
