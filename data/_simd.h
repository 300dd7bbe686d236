/* What the C extensions data/_jpegroi.c and data/_normalize.c share: the switch between their
 * AVX2 kernels and plain C. The kernels are compiled per function (__attribute__((target))), so
 * the switch is made at run time: on where the CPU has AVX2, off elsewhere, and tests turn it off
 * to check the plain C against the same expectations. Include after Python.h. */

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_AVX2_KERNELS 1
#include <immintrin.h>
#endif

static int use_simd = 0; /* set at import (simd_init): the CPU has AVX2 */

static void simd_init(void) {
#ifdef HAVE_AVX2_KERNELS
  use_simd = __builtin_cpu_supports("avx2");
#endif
}

/* _set_simd(flag) -> previous: use the AVX2 kernels (where the CPU has them) or plain C. */
static PyObject *set_simd(PyObject *self, PyObject *arg) {
  (void)self;
  int want = PyObject_IsTrue(arg);
  if (want < 0) return NULL;
  PyObject *was = PyBool_FromLong(use_simd);
#ifdef HAVE_AVX2_KERNELS
  use_simd = want && __builtin_cpu_supports("avx2");
#endif
  return was;
}
