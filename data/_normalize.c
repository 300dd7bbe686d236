/* data._normalize: the network's input from a uint8 batch on a CPU, in one pass
 * (data/normalize.py, normalize_batch).
 *
 * out[p, i] = (float)images[p, i] + shift[p] for every plane p (one image's channel) and pixel i:
 * the mean subtracted and the image's PCA colour offset added, as torch's `out.copy_(images)`
 * then `out.add_(shift)` compute it (each value is one float32 addition of the same two
 * operands, so the bits are the same; tests/test_transforms.py checks it against torch).
 *
 * Why: torch makes two passes over the float output, a batch of 128 at 224 x 224 being 77 MB,
 * more than the caches: the second pass reads back from memory what the first just wrote. One
 * pass reads the uint8 once and writes each float once. For outputs larger than the caches
 * (`stream`), the writes are non-temporal: they go to memory without first reading each line
 * into the cache. Measured on the training reader's batches (docs/BENCHMARKS.md): about a third
 * of torch's time.
 *
 * The AVX2 kernel (16 pixels a step) is compiled per function and used when the CPU has AVX2
 * (data/_simd.h); plain C otherwise (the compiler vectorises it with SSE2). No Python calls
 * while it runs: the GIL is released.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

#include "_simd.h"

static void normalize_plane(const uint8_t *src, float *dst, Py_ssize_t n, float shift) {
  for (Py_ssize_t i = 0; i < n; i++) dst[i] = (float)src[i] + shift;
}

#ifdef HAVE_AVX2_KERNELS

/* normalize_plane, 16 pixels a step; `stream`: non-temporal stores, from the first 32-byte
 * aligned output onwards (the plain loop does the pixels before it and after the last step). */
__attribute__((target("avx2"))) static void normalize_plane_avx2(const uint8_t *src, float *dst,
                                                                 Py_ssize_t n, float shift,
                                                                 int stream) {
  const __m256 k = _mm256_set1_ps(shift);
  Py_ssize_t i = 0;
  if (stream) {
    while (i < n && ((uintptr_t)(dst + i) & 31) != 0) i++;
    normalize_plane(src, dst, i, shift);
  }
  for (; i + 16 <= n; i += 16) {
    const __m128i v = _mm_loadu_si128((const __m128i *)(src + i));
    const __m256 lo = _mm256_add_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), k);
    const __m256 hi = _mm256_add_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8))), k);
    if (stream) {
      _mm256_stream_ps(dst + i, lo);
      _mm256_stream_ps(dst + i + 8, hi);
    } else {
      _mm256_storeu_ps(dst + i, lo);
      _mm256_storeu_ps(dst + i + 8, hi);
    }
  }
  normalize_plane(src + i, dst + i, n - i, shift);
}
#endif

PyDoc_STRVAR(normalize_doc,
"normalize(images, shift, out, plane, stream)\n"
"\n"
"out[p * plane + i] = float(images[p * plane + i]) + shift[p]: `images` uint8 (C-contiguous\n"
"buffer of P x plane values), `shift` P float32, `out` a writable C-contiguous buffer of\n"
"P x plane float32. `stream`: non-temporal stores (an output larger than the caches).\n"
"Releases the GIL.");

static PyObject *normalize_py(PyObject *self, PyObject *args, PyObject *kwargs) {
  static char *keywords[] = {"images", "shift", "out", "plane", "stream", NULL};
  Py_buffer images, shift, out;
  Py_ssize_t plane;
  int stream;
  (void)self;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*y*w*np:normalize", keywords, &images, &shift,
                                   &out, &plane, &stream))
    return NULL;
  PyObject *result = NULL;
  const Py_ssize_t planes = plane > 0 ? images.len / plane : 0;
  if (plane <= 0 || images.len % plane != 0)
    PyErr_Format(PyExc_ValueError, "images (%zd bytes) is not whole planes of %zd", images.len,
                 plane);
  else if (shift.len != planes * (Py_ssize_t)sizeof(float))
    PyErr_Format(PyExc_ValueError, "shift has %zd bytes, not %zd float32 (one a plane)", shift.len,
                 planes);
  else if (out.len != images.len * (Py_ssize_t)sizeof(float))
    PyErr_Format(PyExc_ValueError, "out has %zd bytes, not %zd float32 (one a pixel)", out.len,
                 images.len);
  else {
    const uint8_t *src = images.buf;
    const float *k = shift.buf;
    float *dst = out.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t p = 0; p < planes; p++) {
#ifdef HAVE_AVX2_KERNELS
      if (use_simd) {
        normalize_plane_avx2(src + p * plane, dst + p * plane, plane, k[p], stream);
        continue;
      }
#endif
      normalize_plane(src + p * plane, dst + p * plane, plane, k[p]);
    }
#ifdef HAVE_AVX2_KERNELS
    if (use_simd && stream) _mm_sfence(); /* the streamed stores before anyone reads `out` */
#endif
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
  }
  PyBuffer_Release(&images);
  PyBuffer_Release(&shift);
  PyBuffer_Release(&out);
  return result;
}

static PyMethodDef methods[] = {
    {"normalize", (PyCFunction)(void (*)(void))normalize_py, METH_VARARGS | METH_KEYWORDS,
     normalize_doc},
    {"_set_simd", set_simd, METH_O,
     "_set_simd(flag) -> previous: use the AVX2 kernel (where the CPU has it) or plain C"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "data._normalize",
    .m_doc = "A uint8 batch to the network's float32 input in one pass on a CPU; see "
             "data/_normalize.c.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__normalize(void) {
  simd_init();
  return PyModule_Create(&module);
}
