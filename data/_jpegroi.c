/* data._jpegroi: decode only a region of a JPEG, with the system's libjpeg-turbo, and resize it
 * into a training view (the resampling section below).
 *
 * The training view keeps about 60% of a typical ImageNet photo (the source window of a random
 * 224 crop of the 256 square; data/transforms.py). This module decodes just that window, as
 * NVIDIA DALI's CPU ImageRandomCrop does:
 *
 *   jpeg_crop_scanline   decodes only the iMCU columns that cover the window (the left edge
 *                        moves down to an iMCU boundary; libjpeg says where);
 *   jpeg_skip_scanlines  entropy-decodes the rows above the window but skips their IDCT,
 *                        upsampling and colour conversion;
 *   jpeg_read_scanlines  then reads only the window's rows, and the decoder is destroyed
 *                        before the rows below are touched.
 *
 * Exactness. The pixels of the requested region equal those of a full decode
 * (simplejpeg.decode_jpeg(data, colorspace="RGB"): accurate integer IDCT, fancy upsampling) bit
 * for bit. A cropped decode alone does not give that at the crop's left and right edges: the
 * fancy upsampler of 4:2:0 / 4:2:2 chroma blends each chroma sample with its neighbours, and
 * at a crop edge it treats the crop's first and last chroma samples as the image edge
 * (replicating them), which changes the crop's first and, for an even width, last column; a
 * crop whose chroma row is one sample wide is even upsampled without blending. So the columns
 * are widened by MARGIN_COLS = 2 on each side before cropping: the inexact columns then lie
 * outside the region, and the crop is at least 3 columns (2 chroma samples) wide. They are
 * returned too (the caller slices them off without a copy). Skipping rows needs no margin:
 * when the upsampler needs vertical context (4:2:0, 4:4:0), jpeg_skip_scanlines skips only
 * whole iMCU rows ending at least one iMCU row above the first row wanted and runs the rest
 * through the upsampler (discarding it), so the rows read equal a full decode's.
 * tests/test_jpegroi.py checks 4:4:4, 4:2:2, 4:2:0, 4:4:0, 4:1:1, greyscale and progressive
 * files; with a margin of 1 column, 1-column regions at the left edge of 4:2:0 files differ.
 *
 * Errors: libjpeg's default error_exit() calls exit(). Here a fatal error longjmp()s back and
 * becomes ValueError, and so does every warning ("Premature end of JPEG file", "Corrupt JPEG
 * data: ..."), like TurboJPEG's stop-on-warning: a file libjpeg must patch up is left to the
 * caller's full decode, which decides as it always did. Nothing is printed. The GIL is released
 * while libjpeg decodes (the header, microseconds, is read with it held, to size the output).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

#include "_simd.h"

#ifndef LIBJPEG_TURBO_VERSION_NUMBER
#error "data._jpegroi needs libjpeg-turbo (jpeg_crop_scanline, jpeg_skip_scanlines)"
#endif

/* Columns added on each side of the requested region before cropping (see Exactness above).
 * Cheap: it moves the crop's left edge down one more iMCU column (16 pixels at 4:2:0) only
 * when the region starts within 2 pixels of one. */
#define MARGIN_COLS 2

typedef struct {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
} ErrorManager;

static void error_exit(j_common_ptr cinfo) {
  ErrorManager *err = (ErrorManager *)cinfo->err;
  (*cinfo->err->format_message)(cinfo, err->message);
  longjmp(err->jump, 1);
}

static void emit_message(j_common_ptr cinfo, int msg_level) {
  if (msg_level < 0) { /* a warning: corrupt or truncated data that libjpeg would patch up */
    ErrorManager *err = (ErrorManager *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
  }
  /* trace messages (msg_level >= 0): ignored */
}

static void output_message(j_common_ptr cinfo) { (void)cinfo; /* never print */ }

/* One call's arguments, results and libjpeg state. */
typedef struct {
  struct jpeg_decompress_struct cinfo;
  ErrorManager err;
  const unsigned char *data;
  unsigned long size;
  /* the region asked for, and the columns to decode (decode_region only) */
  long top, left, height, width, first, last;
  /* results */
  unsigned char *pixels; /* height rows of out_width RGB pixels, allocated by the caller */
  Py_ssize_t capacity;   /* bytes at pixels */
  JDIMENSION image_height, image_width, x_offset, out_width;
  J_COLOR_SPACE colorspace;
  int progressive;
  JSAMPROW *rows;
  char problem[JMSG_LENGTH_MAX + 128]; /* set when it fails */
} Job;

static void job_init(Job *job, const Py_buffer *data) {
  memset(job, 0, sizeof(*job));
  job->data = (const unsigned char *)data->buf;
  job->size = (unsigned long)data->len;
  job->cinfo.err = jpeg_std_error(&job->err.pub);
  job->err.pub.error_exit = error_exit;
  job->err.pub.emit_message = emit_message;
  job->err.pub.output_message = output_message;
}

static void job_free(Job *job) {
  jpeg_destroy_decompress(&job->cinfo); /* idempotent; safe on a zeroed or half-made object */
  free(job->rows);
  job->rows = NULL;
}

/* Read the header into job; 0 on success. Call inside the setjmp scope. */
static int read_header(Job *job) {
  jpeg_create_decompress(&job->cinfo);
  jpeg_mem_src(&job->cinfo, job->data, job->size);
  if (jpeg_read_header(&job->cinfo, TRUE) != JPEG_HEADER_OK) {
    snprintf(job->problem, sizeof(job->problem), "no image in the JPEG data (tables only)");
    return -1;
  }
  job->image_height = job->cinfo.image_height;
  job->image_width = job->cinfo.image_width;
  job->colorspace = job->cinfo.jpeg_color_space;
  job->progressive = job->cinfo.progressive_mode;
  return 0;
}

static const char *colorspace_name(J_COLOR_SPACE space) {
  switch (space) {
    case JCS_GRAYSCALE: return "Gray";
    case JCS_RGB: return "RGB";
    case JCS_YCbCr: return "YCbCr";
    case JCS_CMYK: return "CMYK";
    case JCS_YCCK: return "YCCK";
    default: return "unknown";
  }
}

/* Read the header and check the colour space and the region; 0 on success, else job->problem
 * says why. Cheap (the markers before the first scan); run with the GIL held. */
static int check_region(Job *job) {
  if (setjmp(job->err.jump)) {
    snprintf(job->problem, sizeof(job->problem), "%s", job->err.message);
    return -1;
  }
  if (read_header(job) != 0) return -1;
  if (job->colorspace != JCS_GRAYSCALE && job->colorspace != JCS_YCbCr &&
      job->colorspace != JCS_RGB) {
    snprintf(job->problem, sizeof(job->problem),
             "%s JPEGs are not decoded to RGB here; decode the whole image instead",
             colorspace_name(job->colorspace));
    return -1;
  }
  if (job->top > (long)job->image_height - job->height ||  /* written so as not to overflow */
      job->left > (long)job->image_width - job->width) {
    snprintf(job->problem, sizeof(job->problem),
             "region rows %ld..%ld, columns %ld..%ld is not inside the %ux%u image "
             "(height x width)",
             job->top, job->top + job->height, job->left, job->left + job->width,
             job->image_height, job->image_width);
    return -1;
  }
  /* the columns to decode: the region widened by the margin; jpeg_crop_scanline will move the
   * left edge down to an iMCU column, at most 8 x max_h_samp_factor - 1 more */
  job->first = job->left > MARGIN_COLS ? job->left - MARGIN_COLS : 0;
  job->last = job->left + job->width + MARGIN_COLS;
  if (job->last > (long)job->image_width) job->last = job->image_width;
  long most = job->last - job->first + 8L * job->cinfo.max_h_samp_factor - 1;
  if (most > (long)job->image_width) most = job->image_width;
  job->capacity = (Py_ssize_t)job->height * most * 3;
  return 0;
}

/* The decode itself, after check_region: 0 on success, else job->problem says why. Makes no
 * Python calls; run without the GIL. */
static int run_decode(Job *job) {
  struct jpeg_decompress_struct *cinfo = &job->cinfo;
  if (setjmp(job->err.jump)) {
    snprintf(job->problem, sizeof(job->problem), "%s", job->err.message);
    return -1;
  }
  /* simplejpeg's defaults: RGB, accurate integer IDCT, fancy upsampling */
  cinfo->out_color_space = JCS_RGB;
  cinfo->dct_method = JDCT_ISLOW;
  cinfo->do_fancy_upsampling = TRUE;
  jpeg_start_decompress(cinfo);
  if (cinfo->output_components != 3) {
    snprintf(job->problem, sizeof(job->problem), "libjpeg gives %d components, not 3",
             cinfo->output_components);
    return -1;
  }

  /* columns: libjpeg aligns the left edge down to an iMCU column and says where */
  JDIMENSION x = (JDIMENSION)job->first, w = (JDIMENSION)(job->last - job->first);
  if (w < cinfo->output_width) jpeg_crop_scanline(cinfo, &x, &w);
  job->x_offset = x;
  job->out_width = w;
  Py_ssize_t row_bytes = (Py_ssize_t)w * 3;
  if (row_bytes * job->height > job->capacity) { /* cannot happen: check_region bounds it */
    snprintf(job->problem, sizeof(job->problem), "a crop of %u columns exceeds the buffer", w);
    return -1;
  }

  /* rows: entropy-decode the rows above without reconstructing them */
  if (job->top > 0 &&
      jpeg_skip_scanlines(cinfo, (JDIMENSION)job->top) != (JDIMENSION)job->top) {
    snprintf(job->problem, sizeof(job->problem), "could not skip %ld rows", job->top);
    return -1;
  }
  job->rows = malloc(sizeof(JSAMPROW) * (size_t)job->height);
  if (job->rows == NULL) {
    snprintf(job->problem, sizeof(job->problem), "out of memory");
    return -1;
  }
  for (long r = 0; r < job->height; r++) job->rows[r] = job->pixels + r * row_bytes;
  long done = 0;
  while (done < job->height) {
    JDIMENSION got =
        jpeg_read_scanlines(cinfo, job->rows + done, (JDIMENSION)(job->height - done));
    if (got == 0) {
      snprintf(job->problem, sizeof(job->problem), "libjpeg returned no rows at row %ld",
               job->top + done);
      return -1;
    }
    done += got;
  }
  /* the rows below are never decoded: jpeg_destroy_decompress (job_free) drops the rest, as
   * jpeg_abort_decompress would */
  return 0;
}

/* ---------------------------------------------------------------- resampling
 *
 * The training view's resize (data/transforms.py, TrainTransform): an h x w window of RGB
 * pixels is resized by scale_factor sf with an antialiased bilinear (triangle) filter, and the
 * crop x crop patch at (dy, dx) of the result is written, mirrored left-right when flip, as
 * planar (3, crop, crop) uint8: the batch's layout. Only the patch is computed: its columns
 * for the rows its rows need, then its rows.
 *
 * The arithmetic is that of torch's uint8 kernel for F.interpolate(mode="bilinear",
 * antialias=True, align_corners=False, scale_factor=sf, recompute_scale_factor=False) (ATen's
 * UpSampleKernel, after Pillow-SIMD), step for step, so the pixels are the same bit for bit
 * (tests/test_jpegroi.py checks it against torch):
 *   - the output size is trunc(in * sf); an axis whose output size equals its input size is
 *     copied, not filtered (torch skips it);
 *   - along an axis, with scale = 1 / sf and support = max(scale, 1), output pixel i takes
 *     input pixels [trunc(c - support + 0.5), trunc(c + support + 0.5)) (clipped to the
 *     image), c = scale * (i + 0.5), weighted max(0, 1 - |j - c + 0.5| / max(scale, 1)) and
 *     normalised to sum 1, in double precision;
 *   - the weights become int16 with `precision` fraction bits, the most that keeps twice the
 *     axis' largest weight below 2^15, rounded half away from zero;
 *   - the horizontal pass runs first and rounds to uint8 (add 2^(precision-1), shift right,
 *     clamp to 0..255), then the vertical pass the same way.
 * Integer sums are exact, so the order of the additions (SIMD or not) does not matter.
 * An evaluation view (EvalTransform, TenViewTransform: `resize`) is the same arithmetic with the
 * output size given, as F.interpolate(..., size=...) does it: out = that size, scale = in / out.
 */

#define RESAMPLE_PAD 16 /* bytes readable past a row's last pixel that the SIMD kernels load */

typedef struct {
  long count;         /* output pixels wanted (crop) */
  int taps;           /* weights per output pixel, zero-padded to a common count */
  unsigned precision; /* fraction bits of the weights */
  long *start;        /* (count) first input pixel of each output, start + taps <= in */
  int16_t *weights;   /* (count, taps) */
} Axis;

static double triangle(double x) {
  if (x < 0.0) x = -x;
  return x < 1.0 ? 1.0 - x : 0.0;
}

static void axis_free(Axis *a) {
  free(a->start);
  free(a->weights);
  a->start = NULL;
  a->weights = NULL;
}

/* The weights of outputs first..first+count-1 of an axis of `in` input and `out` output pixels
 * (see above), taps padded up to a multiple of `multiple` (at most `in`); 0, or -1 when out of
 * memory. Every output's weights are computed: the precision depends on the largest of all.
 * `scale`: input pixels per output pixel as torch's area_pixel_compute_scale has it, 1 / sf for
 * a scale factor, in / out for a size. */
static int axis_init(Axis *a, long in, long out, double scale, long first, long count, int multiple) {
  const double support = scale >= 1.0 ? scale : 1.0;
  const double invscale = scale >= 1.0 ? 1.0 / scale : 1.0;
  const long max_size = (long)ceil(support) * 2 + 1;
  memset(a, 0, sizeof(*a));
  double *w = malloc(sizeof(double) * (size_t)(max_size * (count + 1)));
  long *lo = malloc(sizeof(long) * (size_t)count), *size = malloc(sizeof(long) * (size_t)count);
  if (w == NULL || lo == NULL || size == NULL) goto fail;
  double wt_max = 0.0;
  long most = 1;
  for (long i = 0; i < out; i++) {
    const int wanted = i >= first && i < first + count;
    double *wi = wanted ? w + (i - first) * max_size : w + count * max_size; /* else scratch */
    const double center = scale * ((double)i + 0.5);
    long xmin = (long)(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    long xmax = (long)(center + support + 0.5);
    if (xmax > in) xmax = in;
    long xsize = xmax - xmin;
    if (xsize < 0) xsize = 0;
    if (xsize > max_size) xsize = max_size;
    double total = 0.0;
    for (long j = 0; j < xsize; j++) {
      wi[j] = triangle(((double)(j + xmin) - center + 0.5) * invscale);
      total += wi[j];
    }
    if (total != 0.0) {
      for (long j = 0; j < xsize; j++) {
        wi[j] /= total;
        if (wi[j] > wt_max) wt_max = wi[j];
      }
    }
    if (wanted) {
      lo[i - first] = xmin;
      size[i - first] = xsize;
      if (xsize > most) most = xsize;
    }
  }
  unsigned precision;
  for (precision = 0; precision < 22; ++precision) {
    int next = (int)(0.5 + wt_max * (1 << (precision + 1)));
    if (next >= (1 << 15)) break;
  }
  long taps = (most + multiple - 1) / multiple * multiple;
  if (taps > in) taps = in;
  a->count = count;
  a->taps = (int)taps;
  a->precision = precision;
  a->start = malloc(sizeof(long) * (size_t)count);
  a->weights = calloc((size_t)(count * taps), sizeof(int16_t));
  if (a->start == NULL || a->weights == NULL) goto fail;
  for (long i = 0; i < count; i++) {
    long start = lo[i] < in - taps ? lo[i] : in - taps; /* keep start + taps <= in */
    a->start[i] = start;
    for (long j = 0; j < size[i]; j++) {
      double v = w[i * max_size + j] * (1 << precision);
      a->weights[i * taps + lo[i] - start + j] =
          (int16_t)(v < 0 ? (int)(-0.5 + v) : (int)(0.5 + v));
    }
  }
  free(w);
  free(lo);
  free(size);
  return 0;
fail:
  free(w);
  free(lo);
  free(size);
  axis_free(a);
  return -1;
}

static inline uint8_t clip8(int32_t v, unsigned precision) {
  v >>= precision;
  return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
}

static inline int32_t rounding(unsigned precision) {
  return precision > 0 ? 1 << (precision - 1) : 0;
}

/* One row, horizontal pass: output pixel j (mirrored: count-1-j) of `dst` from `src` (RGB). */
static void horizontal_row(const uint8_t *src, uint8_t *dst, const Axis *a, int flip) {
  const int32_t init = rounding(a->precision);
  for (long j = 0; j < a->count; j++) {
    const uint8_t *p = src + a->start[j] * 3;
    const int16_t *k = a->weights + j * a->taps;
    int32_t r = init, g = init, b = init;
    for (int t = 0; t < a->taps; t++) {
      r += k[t] * p[3 * t];
      g += k[t] * p[3 * t + 1];
      b += k[t] * p[3 * t + 2];
    }
    uint8_t *o = dst + 3 * (flip ? a->count - 1 - j : j);
    o[0] = clip8(r, a->precision);
    o[1] = clip8(g, a->precision);
    o[2] = clip8(b, a->precision);
  }
}

/* One output row, vertical pass, into `dst` (n bytes): rows[t] + from are the taps' input rows. */
static void vertical_row(const uint8_t *const *rows, const int16_t *k, int taps, unsigned precision,
                         long n, uint8_t *dst, long from) {
  const int32_t init = rounding(precision);
  for (long b = 0; b < n; b++) {
    int32_t v = init;
    for (int t = 0; t < taps; t++) v += k[t] * rows[t][from + b];
    dst[b] = clip8(v, precision);
  }
}

/* An RGB row of n pixels into three planes. */
static void split_row(const uint8_t *src, long n, uint8_t *r, uint8_t *g, uint8_t *b) {
  for (long x = 0; x < n; x++) {
    r[x] = src[3 * x];
    g[x] = src[3 * x + 1];
    b[x] = src[3 * x + 2];
  }
}

#ifdef HAVE_AVX2_KERNELS
#define RESAMPLE_AVX2 1

/* The horizontal weights in the form the AVX2 kernels take, in output order (mirrored when
 * flip): output n starts `offset[n]` bytes into its row and has `groups` x 4 taps, stored as
 * two int16 vectors per 4 taps, (w0 w1 w0 w1 w0 w1 0 0) and (w2 w3 w2 w3 w2 w3 0 0), which
 * multiply-add the (r g b) of two pixels (see `pair01`, `pair23`). */
typedef struct {
  long count;
  int groups;
  unsigned precision;
  long *offset;
  int16_t *wide;
} WideAxis;

static void wide_free(WideAxis *h) {
  free(h->offset);
  free(h->wide);
  h->offset = NULL;
  h->wide = NULL;
}

static int wide_init(WideAxis *h, const Axis *a, int flip) {
  h->count = a->count;
  h->groups = a->taps / 4;
  h->precision = a->precision;
  h->offset = malloc(sizeof(long) * (size_t)a->count);
  h->wide = calloc((size_t)(a->count * h->groups * 16), sizeof(int16_t));
  if (h->offset == NULL || h->wide == NULL) {
    wide_free(h);
    return -1;
  }
  for (long n = 0; n < a->count; n++) {
    const long j = flip ? a->count - 1 - n : n;
    h->offset[n] = a->start[j] * 3;
    for (int t = 0; t < a->taps; t++) {
      int16_t *v = h->wide + (n * h->groups + t / 4) * 16 + (t % 4 >= 2 ? 8 : 0);
      for (int c = 0; c < 3; c++) v[2 * c + t % 2] = a->weights[j * a->taps + t];
    }
  }
  return 0;
}

/* The shuffles that turn 16 bytes of RGB pixels p0 p1 p2 p3 (p4 p5) into int16 pairs
 * (r0 r1 g0 g1 b0 b1 0 0) and (r2 r3 g2 g3 b2 b3 0 0). */
#define PAIR01 0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1
#define PAIR23 6, -1, 9, -1, 7, -1, 10, -1, 8, -1, 11, -1, -1, -1, -1, -1

/* horizontal_row with SSSE3 shuffles and multiply-adds, one row: src must stay readable
 * RESAMPLE_PAD bytes past the last tap, dst 1 byte past its last pixel (each 4-byte store
 * spills one byte into the next pixel, written next). */
__attribute__((target("avx2"))) static void horizontal_row_avx2(const uint8_t *src, uint8_t *dst,
                                                                const WideAxis *h) {
  const __m128i pair01 = _mm_setr_epi8(PAIR01), pair23 = _mm_setr_epi8(PAIR23);
  const __m128i init = _mm_set1_epi32(rounding(h->precision));
  const __m128i shift = _mm_cvtsi32_si128((int)h->precision);
  const int16_t *k = h->wide;
  for (long n = 0; n < h->count; n++) {
    const uint8_t *p = src + h->offset[n];
    __m128i acc = init;
    for (int g = 0; g < h->groups; g++, p += 12, k += 16) {
      const __m128i pixels = _mm_loadu_si128((const __m128i *)p);
      const __m128i w01 = _mm_loadu_si128((const __m128i *)k);
      const __m128i w23 = _mm_loadu_si128((const __m128i *)(k + 8));
      acc = _mm_add_epi32(acc, _mm_madd_epi16(_mm_shuffle_epi8(pixels, pair01), w01));
      acc = _mm_add_epi32(acc, _mm_madd_epi16(_mm_shuffle_epi8(pixels, pair23), w23));
    }
    acc = _mm_sra_epi32(acc, shift);
    acc = _mm_packus_epi16(_mm_packs_epi32(acc, acc), acc);
    const int32_t rgbx = _mm_cvtsi128_si32(acc);
    memcpy(dst + 3 * n, &rgbx, 4);
  }
}

/* Two rows per AVX2 register (one per 128-bit lane): their (r g b) sums for output pixel k. */
__attribute__((target("avx2"), always_inline)) static inline __m256i
two_rows(const uint8_t *a, const uint8_t *b, const int16_t *k, int groups, __m256i acc) {
  const __m256i pair01 = _mm256_broadcastsi128_si256(_mm_setr_epi8(PAIR01));
  const __m256i pair23 = _mm256_broadcastsi128_si256(_mm_setr_epi8(PAIR23));
  for (int g = 0; g < groups; g++, a += 12, b += 12, k += 16) {
    const __m256i pixels =
        _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)a)),
                                _mm_loadu_si128((const __m128i *)b), 1);
    const __m256i w01 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)k));
    const __m256i w23 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(k + 8)));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_shuffle_epi8(pixels, pair01), w01));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_shuffle_epi8(pixels, pair23), w23));
  }
  return acc;
}

/* horizontal_row_avx2 for four rows at once (src + i * stride into dst + i * dst_stride), each
 * output's weights loaded once for the four; `groups` is a constant where it is inlined. */
__attribute__((target("avx2"), always_inline)) static inline void
four_rows(const uint8_t *src, Py_ssize_t stride, uint8_t *dst, Py_ssize_t dst_stride,
          const WideAxis *h, int groups) {
  const __m256i init = _mm256_set1_epi32(rounding(h->precision));
  const __m128i shift = _mm_cvtsi32_si128((int)h->precision);
  const uint8_t *s1 = src + stride, *s2 = src + 2 * stride, *s3 = src + 3 * stride;
  uint8_t *d1 = dst + dst_stride, *d2 = dst + 2 * dst_stride, *d3 = dst + 3 * dst_stride;
  const long count = h->count;
  const long *offset = h->offset;
  const int16_t *k = h->wide;
  for (long n = 0; n < count; n++, k += 16 * groups) {
    const long at = offset[n];
    __m256i acc01 = two_rows(src + at, s1 + at, k, groups, init);
    __m256i acc23 = two_rows(s2 + at, s3 + at, k, groups, init);
    acc01 = _mm256_sra_epi32(acc01, shift);
    acc23 = _mm256_sra_epi32(acc23, shift);
    /* rows 0 and 2 in the low lane, 1 and 3 in the high lane: 4 bytes (r g b 0) each */
    const __m256i bytes = _mm256_packus_epi16(_mm256_packs_epi32(acc01, acc23), init);
    const __m128i lo = _mm256_castsi256_si128(bytes), hi = _mm256_extracti128_si256(bytes, 1);
    int32_t v = _mm_cvtsi128_si32(lo);
    memcpy(dst + 3 * n, &v, 4);
    v = _mm_extract_epi32(lo, 1);
    memcpy(d2 + 3 * n, &v, 4);
    v = _mm_cvtsi128_si32(hi);
    memcpy(d1 + 3 * n, &v, 4);
    v = _mm_extract_epi32(hi, 1);
    memcpy(d3 + 3 * n, &v, 4);
  }
}

__attribute__((target("avx2"))) static void
horizontal_4rows_avx2(const uint8_t *src, Py_ssize_t stride, uint8_t *dst, Py_ssize_t dst_stride,
                      const WideAxis *h) {
  switch (h->groups) { /* up to 4 taps (downscales below 2x), 8 (below 4x): unrolled */
    case 1: four_rows(src, stride, dst, dst_stride, h, 1); break;
    case 2: four_rows(src, stride, dst, dst_stride, h, 2); break;
    default: four_rows(src, stride, dst, dst_stride, h, h->groups); break;
  }
}

#define VERTICAL_PAIRS_AVX2 8 /* the AVX2 vertical kernel takes up to 2 x this taps */

/* vertical_row, 16 bytes at a time with AVX2 (the tail in C): two taps per multiply-add, their
 * rows' bytes interleaved as int16 pairs; `pairs` is a constant where it is inlined. */
__attribute__((target("avx2"), always_inline)) static inline void
vertical_pairs(const uint8_t *const *rows, const int16_t *k, int pairs, unsigned precision, long n,
               uint8_t *dst) {
  const __m256i init = _mm256_set1_epi32(rounding(precision));
  const __m128i shift = _mm_cvtsi32_si128((int)precision);
  __m256i w[VERTICAL_PAIRS_AVX2];
  const uint8_t *r[2 * VERTICAL_PAIRS_AVX2];
  for (int t = 0; t < pairs; t++) {
    const uint32_t pair = (uint32_t)(uint16_t)k[2 * t] | (uint32_t)(uint16_t)k[2 * t + 1] << 16;
    w[t] = _mm256_set1_epi32((int32_t)pair);
    r[2 * t] = rows[2 * t];
    r[2 * t + 1] = rows[2 * t + 1];
  }
  long b = 0;
  for (; b + 16 <= n; b += 16) {
    __m256i lo = init, hi = init;
    for (int t = 0; t < pairs; t++) {
      const __m256i x = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(r[2 * t] + b)));
      const __m256i y = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(r[2 * t + 1] + b)));
      lo = _mm256_add_epi32(lo, _mm256_madd_epi16(_mm256_unpacklo_epi16(x, y), w[t]));
      hi = _mm256_add_epi32(hi, _mm256_madd_epi16(_mm256_unpackhi_epi16(x, y), w[t]));
    }
    lo = _mm256_sra_epi32(lo, shift);
    hi = _mm256_sra_epi32(hi, shift);
    const __m256i words = _mm256_packs_epi32(lo, hi);      /* per lane: 8 outputs in order */
    __m256i bytes = _mm256_packus_epi16(words, words);     /* lane 0: 0..7, lane 1: 8..15 */
    bytes = _mm256_permute4x64_epi64(bytes, _MM_SHUFFLE(3, 1, 2, 0));
    _mm_storeu_si128((__m128i *)(dst + b), _mm256_castsi256_si128(bytes));
  }
  if (b < n) vertical_row(rows, k, 2 * pairs, precision, n - b, dst + b, b);
}

__attribute__((target("avx2"))) static void vertical_row_avx2(const uint8_t *const *rows,
                                                              const int16_t *k, int taps,
                                                              unsigned precision, long n,
                                                              uint8_t *dst) {
  switch (taps / 2) { /* 2 taps (upscales), 4 (downscales below 1.5x), 6 (below 2.5x): unrolled */
    case 1: vertical_pairs(rows, k, 1, precision, n, dst); break;
    case 2: vertical_pairs(rows, k, 2, precision, n, dst); break;
    case 3: vertical_pairs(rows, k, 3, precision, n, dst); break;
    default: vertical_pairs(rows, k, taps / 2, precision, n, dst); break;
  }
}

/* split_row, 16 pixels at a time with SSSE3 shuffles. */
__attribute__((target("avx2"))) static void split_row_avx2(const uint8_t *src, long n, uint8_t *r,
                                                           uint8_t *g, uint8_t *b) {
  const __m128i ra = _mm_setr_epi8(0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i rb = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, 2, 5, 8, 11, 14, -1, -1, -1, -1, -1);
  const __m128i rc = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 1, 4, 7, 10, 13);
  const __m128i ga = _mm_setr_epi8(1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i gb = _mm_setr_epi8(-1, -1, -1, -1, -1, 0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1);
  const __m128i gc = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 2, 5, 8, 11, 14);
  const __m128i ba = _mm_setr_epi8(2, 5, 8, 11, 14, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i bb = _mm_setr_epi8(-1, -1, -1, -1, -1, 1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1);
  const __m128i bc = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 3, 6, 9, 12, 15);
  long x = 0;
  for (; x + 16 <= n; x += 16) {
    const __m128i a = _mm_loadu_si128((const __m128i *)(src + 3 * x));
    const __m128i m = _mm_loadu_si128((const __m128i *)(src + 3 * x + 16));
    const __m128i c = _mm_loadu_si128((const __m128i *)(src + 3 * x + 32));
    const __m128i red = _mm_or_si128(_mm_shuffle_epi8(a, ra), _mm_shuffle_epi8(m, rb));
    const __m128i green = _mm_or_si128(_mm_shuffle_epi8(a, ga), _mm_shuffle_epi8(m, gb));
    const __m128i blue = _mm_or_si128(_mm_shuffle_epi8(a, ba), _mm_shuffle_epi8(m, bb));
    _mm_storeu_si128((__m128i *)(r + x), _mm_or_si128(red, _mm_shuffle_epi8(c, rc)));
    _mm_storeu_si128((__m128i *)(g + x), _mm_or_si128(green, _mm_shuffle_epi8(c, gc)));
    _mm_storeu_si128((__m128i *)(b + x), _mm_or_si128(blue, _mm_shuffle_epi8(c, bc)));
  }
  split_row(src + 3 * x, n - x, r + x, g + x, b + x);
}
#endif

/* Reverse n bytes in place. */
static void reverse_bytes(uint8_t *p, long n) {
  for (long i = 0, j = n - 1; i < j; i++, j--) {
    const uint8_t t = p[i];
    p[i] = p[j];
    p[j] = t;
  }
}

#ifdef RESAMPLE_AVX2
/* reverse_bytes, 16 bytes from each end at a time with SSSE3 shuffles. */
__attribute__((target("avx2"))) static void reverse_bytes_simd(uint8_t *p, long n) {
  const __m128i mirror = _mm_setr_epi8(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  long i = 0, j = n;  /* bytes [i, j) are left to reverse */
  for (; j - i >= 32; i += 16, j -= 16) {
    const __m128i front = _mm_loadu_si128((const __m128i *)(p + i));
    const __m128i back = _mm_loadu_si128((const __m128i *)(p + j - 16));
    _mm_storeu_si128((__m128i *)(p + i), _mm_shuffle_epi8(back, mirror));
    _mm_storeu_si128((__m128i *)(p + j - 16), _mm_shuffle_epi8(front, mirror));
  }
  reverse_bytes(p + i, j - i);
}
#endif

/* resample_patch without a resize (pre-resized shards): the crop x crop pixels at (dy, dx) of the
 * window split straight into the three planes of `out`, each plane's row then reversed when flip:
 * no intermediate image. */
static void copy_patch(const uint8_t *src, Py_ssize_t stride, long dy, long dx, long crop, int flip,
                       uint8_t *out) {
  const long plane = crop * crop;
  for (long i = 0; i < crop; i++) {
    const uint8_t *rgb = src + (dy + i) * stride + 3 * dx;
    uint8_t *r = out + i * crop;
#ifdef RESAMPLE_AVX2
    if (use_simd) { /* its loads stay inside the row's 3 * crop bytes */
      split_row_avx2(rgb, crop, r, r + plane, r + 2 * plane);
      if (flip)
        for (int c = 0; c < 3; c++) reverse_bytes_simd(r + c * plane, crop);
      continue;
    }
#endif
    split_row(rgb, crop, r, r + plane, r + 2 * plane);
    if (flip)
      for (int c = 0; c < 3; c++) reverse_bytes(r + c * plane, crop);
  }
}

/* How many pixels an axis of n takes when resized by a scale factor sf, as torch has it:
 * trunc(n * sf), with input pixels per output pixel 1 / sf (not n / trunc(n * sf): axis_init). */
static long scaled_size(long n, double sf) { return (long)((double)n * sf); }

/* The (3, crop, crop) patch of an h x w RGB window (row stride `stride` bytes; `end` is the
 * first byte past the source buffer) resized to out_h x out_w with input pixels per output pixel
 * scale_y, scale_x (see axis_init), at (dy, dx) of the resized grid, mirrored when flip, into
 * `out`. 0, or -1 when out of memory. No Python calls: run it without the GIL. The caller checks
 * that 0 <= dy, dx and dy + crop, dx + crop <= out_h, out_w (check_inside). */
static int resample_patch(const uint8_t *src, Py_ssize_t stride, const uint8_t *end, long h, long w,
                          long out_h, long out_w, double scale_y, double scale_x, long dy, long dx,
                          long crop, int flip, uint8_t *out) {
  const int need_h = out_w != w, need_v = out_h != h;
  Axis ax = {0}, ay = {0};
#ifdef RESAMPLE_AVX2
  WideAxis wide = {0};
#endif
  uint8_t *tmp = NULL, *line = NULL;
  const uint8_t **rows = NULL;
  int status = -1;
  if (!need_h && !need_v) { /* no resize (pre-resized shards): the crop's rows straight into the planes */
    copy_patch(src, stride, dy, dx, crop, flip, out);
    return 0;
  }
  if (need_h && axis_init(&ax, w, out_w, scale_x, dx, crop, 4) != 0) goto done;
  if (need_v && axis_init(&ay, h, out_h, scale_y, dy, crop, 2) != 0) goto done;
  /* the window rows the patch needs */
  long y_lo = dy, y_hi = dy + crop;
  if (need_v) {
    y_lo = ay.start[0];
    y_hi = ay.start[crop - 1] + ay.taps;
  }
  const Py_ssize_t tmp_stride = crop * 3 + RESAMPLE_PAD;
  tmp = malloc((size_t)((y_hi - y_lo) * tmp_stride));
  line = malloc((size_t)tmp_stride);
  rows = malloc(sizeof(uint8_t *) * (size_t)(need_v ? ay.taps : 1));
  if (tmp == NULL || line == NULL || rows == NULL) goto done;
#ifdef RESAMPLE_AVX2
  const int simd = use_simd;
  const int simd_h = simd && need_h && ax.taps % 4 == 0;
  const int simd_v = simd && need_v && ay.taps % 2 == 0 && ay.taps <= 2 * VERTICAL_PAIRS_AVX2;
  if (simd_h && wide_init(&wide, &ax, flip) != 0) goto done;
#endif
  /* horizontal pass (or the crop's columns), rows y_lo..y_hi-1 */
  long y = y_lo;
#ifdef RESAMPLE_AVX2
  if (simd_h) /* four rows at a time while the kernel's loads stay inside the buffer */
    for (; y + 4 <= y_hi && src + (y + 3) * stride + 3 * w + RESAMPLE_PAD <= end; y += 4)
      horizontal_4rows_avx2(src + y * stride, stride, tmp + (y - y_lo) * tmp_stride, tmp_stride,
                            &wide);
#endif
  for (; y < y_hi; y++) {
    const uint8_t *row = src + y * stride;
    uint8_t *dst = tmp + (y - y_lo) * tmp_stride;
    if (!need_h) {
      for (long n = 0; n < crop; n++)
        memcpy(dst + 3 * n, row + 3 * (dx + (flip ? crop - 1 - n : n)), 3);
    }
#ifdef RESAMPLE_AVX2
    else if (simd_h && row + 3 * w + RESAMPLE_PAD <= end)
      horizontal_row_avx2(row, dst, &wide);
#endif
    else
      horizontal_row(row, dst, &ax, flip);
  }
  /* vertical pass (or the crop's rows), then into the three planes */
  const long plane = crop * crop;
  for (long i = 0; i < crop; i++) {
    const uint8_t *rgb;
    if (need_v) {
      for (int t = 0; t < ay.taps; t++) rows[t] = tmp + (ay.start[i] + t - y_lo) * tmp_stride;
      const int16_t *k = ay.weights + i * ay.taps;
#ifdef RESAMPLE_AVX2
      if (simd_v)
        vertical_row_avx2(rows, k, ay.taps, ay.precision, crop * 3, line);
      else
#endif
        vertical_row(rows, k, ay.taps, ay.precision, crop * 3, line, 0);
      rgb = line;
    } else {
      rgb = tmp + (dy + i - y_lo) * tmp_stride;
    }
    uint8_t *r = out + i * crop;
#ifdef RESAMPLE_AVX2
    if (simd)
      split_row_avx2(rgb, crop, r, r + plane, r + 2 * plane);
    else
#endif
      split_row(rgb, crop, r, r + plane, r + 2 * plane);
  }
  status = 0;
done:
  axis_free(&ax);
  axis_free(&ay);
#ifdef RESAMPLE_AVX2
  wide_free(&wide);
#endif
  free(tmp);
  free(line);
  free(rows);
  return status;
}

static int check_arg(const char *name, long value, long minimum) {
  if (value < minimum) {
    PyErr_Format(PyExc_ValueError, "%s must be >= %ld, got %ld", name, minimum, value);
    return -1;
  }
  return 0;
}

PyDoc_STRVAR(decode_region_doc,
"decode_region(data, top, left, height, width) -> (pixels, x, stride)\n"
"\n"
"Decode rows top..top+height-1 of a JPEG (greyscale, YCbCr or RGB) to RGB, only as many\n"
"columns as cover left..left+width-1. ``pixels`` is a bytearray of height x stride x 3 uint8\n"
"holding image columns x..x+stride-1 (x <= left, x + stride >= left + width): view it with\n"
"numpy.frombuffer(pixels, numpy.uint8).reshape(height, stride, 3), then take its columns\n"
"left - x .. left - x + width - 1.\n"
"Those pixels equal a full decode's (accurate integer IDCT, fancy upsampling) bit for bit;\n"
"the other columns need not. Raises ValueError for corrupt or truncated data (libjpeg's\n"
"warnings included), CMYK/YCCK JPEGs and a region outside the image. Releases the GIL while\n"
"decoding.");

static PyObject *decode_region(PyObject *self, PyObject *args, PyObject *kwargs) {
  static char *keywords[] = {"data", "top", "left", "height", "width", NULL};
  Py_buffer data;
  long top, left, height, width;
  (void)self;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*llll:decode_region", keywords, &data, &top,
                                   &left, &height, &width))
    return NULL;
  if (check_arg("top", top, 0) || check_arg("left", left, 0) || check_arg("height", height, 1) ||
      check_arg("width", width, 1)) {
    PyBuffer_Release(&data);
    return NULL;
  }
  Job *job = PyMem_RawMalloc(sizeof(Job));
  if (job == NULL) {
    PyBuffer_Release(&data);
    return PyErr_NoMemory();
  }
  job_init(job, &data);
  job->top = top;
  job->left = left;
  job->height = height;
  job->width = width;
  PyObject *pixels = NULL, *result = NULL;
  int status = check_region(job);
  if (status == 0) {
    pixels = PyByteArray_FromStringAndSize(NULL, job->capacity);
    if (pixels == NULL) goto done;
    job->pixels = (unsigned char *)PyByteArray_AS_STRING(pixels);
    Py_BEGIN_ALLOW_THREADS
    status = run_decode(job);
    job_free(job);
    Py_END_ALLOW_THREADS
  }
  if (status != 0) {
    PyErr_Format(PyExc_ValueError, "cannot decode JPEG region: %s", job->problem);
  } else if (PyByteArray_Resize(pixels, (Py_ssize_t)height * job->out_width * 3) == 0) {
    /* at most an iMCU column less: CPython keeps the buffer, nothing is copied */
    result = Py_BuildValue("(OII)", pixels, job->x_offset, job->out_width);
  }
done:
  job_free(job);
  PyMem_RawFree(job);
  PyBuffer_Release(&data);
  Py_XDECREF(pixels);
  return result;
}

/* Check that the crop x crop patch at (dy, dx) lies in the out_h x out_w resized window and that
 * `out` holds it; 0, or -1 with ValueError set. */
static int check_inside(long out_h, long out_w, long dy, long dx, long crop, Py_ssize_t out_len) {
  if (check_arg("crop", crop, 1) || check_arg("dy", dy, 0) || check_arg("dx", dx, 0)) return -1;
  if (dy > out_h - crop || dx > out_w - crop) {
    PyErr_Format(PyExc_ValueError,
                 "patch rows %ld..%ld, columns %ld..%ld is not inside the %ldx%ld resized window",
                 dy, dy + crop, dx, dx + crop, out_h, out_w);
    return -1;
  }
  if (out_len != 3 * crop * crop) {
    PyErr_Format(PyExc_ValueError, "out must hold 3 x %ld x %ld bytes, got %zd", crop, crop,
                 out_len);
    return -1;
  }
  return 0;
}

/* Check a patch request by scale factor (see resample_patch); 0, or -1 with ValueError set. */
static int check_patch(long height, long width, double sf, long dy, long dx, long crop,
                       Py_ssize_t out_len) {
  if (check_arg("height", height, 1) || check_arg("width", width, 1)) return -1;
  if (!(sf > 0.0 && (double)height * sf < 1e9 && (double)width * sf < 1e9)) {
    char text[64];
    snprintf(text, sizeof(text), "%g", sf);
    PyErr_Format(PyExc_ValueError, "scale_factor must be > 0 and keep the sizes sane, got %s",
                 text);
    return -1;
  }
  return check_inside(scaled_size(height, sf), scaled_size(width, sf), dy, dx, crop, out_len);
}

/* Check that the height x width window at (top, left) lies in the buffer `src` of rows of
 * `stride` bytes; 0, or -1 with ValueError set. */
static int check_window(const Py_buffer *src, Py_ssize_t stride, long top, long left, long height,
                        long width) {
  if (check_arg("top", top, 0) || check_arg("left", left, 0)) return -1;
  /* written so as not to overflow: the last row's window ends inside the buffer */
  if ((left + width) * 3 > stride || (left + width) * 3 > src->len ||
      top + height - 1 > (src->len - (left + width) * 3) / stride) {
    PyErr_Format(PyExc_ValueError,
                 "window rows %ld..%ld, columns %ld..%ld is not inside the %zd bytes of pixels "
                 "with rows of %zd bytes",
                 top, top + height, left, left + width, src->len, stride);
    return -1;
  }
  return 0;
}

/* resample_patch of the checked window at (top, left) of `src` into `out`, without the GIL;
 * None, or NULL with MemoryError set. */
static PyObject *resample_window(const Py_buffer *src, Py_ssize_t stride, long top, long left,
                                 long height, long width, long out_h, long out_w, double scale_y,
                                 double scale_x, long dy, long dx, long crop, int flip,
                                 Py_buffer *out) {
  const uint8_t *origin = (const uint8_t *)src->buf + top * stride + left * 3;
  const uint8_t *end = (const uint8_t *)src->buf + src->len;
  int status;
  Py_BEGIN_ALLOW_THREADS
  status = resample_patch(origin, stride, end, height, width, out_h, out_w, scale_y, scale_x, dy,
                          dx, crop, flip, (uint8_t *)out->buf);
  Py_END_ALLOW_THREADS
  if (status != 0) return PyErr_NoMemory();
  return Py_NewRef(Py_None);
}

PyDoc_STRVAR(resample_doc,
"resample(pixels, stride, top, left, height, width, scale_factor, dy, dx, crop, flip, out)\n"
"\n"
"Resize the height x width window at (top, left) of an RGB image (uint8 rows of `stride`\n"
"bytes in the buffer `pixels`) by scale_factor, as torch.nn.functional.interpolate(...,\n"
"mode='bilinear', antialias=True, scale_factor=scale_factor, recompute_scale_factor=False)\n"
"does on uint8, bit for bit, and write the crop x crop patch at (dy, dx) of the result, mirrored\n"
"left-right when flip, into the writable buffer `out` as planar (3, crop, crop) uint8.\n"
"Releases the GIL.");

static PyObject *resample_py(PyObject *self, PyObject *args, PyObject *kwargs) {
  static char *keywords[] = {"pixels", "stride", "top", "left", "height", "width", "scale_factor",
                             "dy", "dx", "crop", "flip", "out", NULL};
  Py_buffer src, out;
  Py_ssize_t stride;
  long top, left, height, width, dy, dx, crop;
  double sf;
  int flip;
  (void)self;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*nlllldlllpw*:resample", keywords, &src, &stride,
                                   &top, &left, &height, &width, &sf, &dy, &dx, &crop, &flip, &out))
    return NULL;
  PyObject *result = NULL;
  if (check_patch(height, width, sf, dy, dx, crop, out.len) == 0 &&
      check_window(&src, stride, top, left, height, width) == 0)
    result = resample_window(&src, stride, top, left, height, width, scaled_size(height, sf),
                             scaled_size(width, sf), 1.0 / sf, 1.0 / sf, dy, dx, crop, flip, &out);
  PyBuffer_Release(&src);
  PyBuffer_Release(&out);
  return result;
}

PyDoc_STRVAR(resize_doc,
"resize(pixels, stride, top, left, height, width, out_height, out_width, dy, dx, crop, flip, out)\n"
"\n"
"resample(...) to a size instead of by a factor: the window resized to out_height x out_width as\n"
"torch.nn.functional.interpolate(..., size=(out_height, out_width), mode='bilinear',\n"
"antialias=True) does on uint8, bit for bit (its scale is then height / out_height), and the\n"
"crop x crop patch at (dy, dx) of the result written into `out`: an evaluation view.\n"
"Releases the GIL.");

static PyObject *resize_py(PyObject *self, PyObject *args, PyObject *kwargs) {
  static char *keywords[] = {"pixels", "stride", "top", "left", "height", "width", "out_height",
                             "out_width", "dy", "dx", "crop", "flip", "out", NULL};
  Py_buffer src, out;
  Py_ssize_t stride;
  long top, left, height, width, out_h, out_w, dy, dx, crop;
  int flip;
  (void)self;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*nlllllllllpw*:resize", keywords, &src, &stride,
                                   &top, &left, &height, &width, &out_h, &out_w, &dy, &dx, &crop,
                                   &flip, &out))
    return NULL;
  PyObject *result = NULL;
  if (check_arg("height", height, 1) == 0 && check_arg("width", width, 1) == 0 &&
      check_arg("out_height", out_h, 1) == 0 && check_arg("out_width", out_w, 1) == 0 &&
      check_inside(out_h, out_w, dy, dx, crop, out.len) == 0 &&
      check_window(&src, stride, top, left, height, width) == 0)
    result = resample_window(&src, stride, top, left, height, width, out_h, out_w,
                             (double)height / (double)out_h, (double)width / (double)out_w, dy, dx,
                             crop, flip, &out);
  PyBuffer_Release(&src);
  PyBuffer_Release(&out);
  return result;
}

PyDoc_STRVAR(decode_view_doc,
"decode_view(data, top, left, height, width, scale_factor, dy, dx, crop, flip, out)\n"
"\n"
"decode_region(data, top, left, height, width), then resample(...) of that window into `out`,\n"
"all without the GIL and without handing the window to Python: the training view of a JPEG.\n"
"Raises ValueError as decode_region and resample do.");

static PyObject *decode_view(PyObject *self, PyObject *args, PyObject *kwargs) {
  static char *keywords[] = {"data", "top", "left", "height", "width", "scale_factor", "dy", "dx",
                             "crop", "flip", "out", NULL};
  Py_buffer data, out;
  long top, left, height, width, dy, dx, crop;
  double sf;
  int flip;
  (void)self;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*lllldlllpw*:decode_view", keywords, &data, &top,
                                   &left, &height, &width, &sf, &dy, &dx, &crop, &flip, &out))
    return NULL;
  PyObject *result = NULL;
  Job *job = NULL;
  if (check_arg("top", top, 0) || check_arg("left", left, 0) ||
      check_patch(height, width, sf, dy, dx, crop, out.len))
    goto done;
  job = PyMem_RawMalloc(sizeof(Job));
  if (job == NULL) {
    PyErr_NoMemory();
    goto done;
  }
  job_init(job, &data);
  job->top = top;
  job->left = left;
  job->height = height;
  job->width = width;
  int status = check_region(job);
  if (status == 0) {
    job->pixels = malloc((size_t)(job->capacity + RESAMPLE_PAD));
    if (job->pixels == NULL) {
      PyErr_NoMemory();
      goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    status = run_decode(job);
    job_free(job);
    if (status == 0) {
      const Py_ssize_t stride = (Py_ssize_t)job->out_width * 3;
      const uint8_t *origin = job->pixels + (left - (long)job->x_offset) * 3;
      status = resample_patch(origin, stride, job->pixels + job->capacity + RESAMPLE_PAD, height,
                              width, scaled_size(height, sf), scaled_size(width, sf), 1.0 / sf,
                              1.0 / sf, dy, dx, crop, flip, (uint8_t *)out.buf);
      if (status != 0) snprintf(job->problem, sizeof(job->problem), "out of memory");
    }
    Py_END_ALLOW_THREADS
  }
  if (status != 0)
    PyErr_Format(PyExc_ValueError, "cannot decode JPEG region: %s", job->problem);
  else
    result = Py_NewRef(Py_None);
done:
  if (job != NULL) {
    job_free(job);
    free(job->pixels);
    PyMem_RawFree(job);
  }
  PyBuffer_Release(&data);
  PyBuffer_Release(&out);
  return result;
}

PyDoc_STRVAR(read_header_doc,
"read_header(data) -> (height, width, colorspace, progressive)\n"
"\n"
"The JPEG header: size, colour space as simplejpeg names it ('Gray', 'RGB', 'YCbCr', 'CMYK',\n"
"'YCCK', 'unknown') and whether it is progressive. Raises ValueError if it is not a JPEG.");

static PyObject *read_header_py(PyObject *self, PyObject *args) {
  Py_buffer data;
  (void)self;
  if (!PyArg_ParseTuple(args, "y*:read_header", &data)) return NULL;
  Job *job = PyMem_RawMalloc(sizeof(Job));
  if (job == NULL) {
    PyBuffer_Release(&data);
    return PyErr_NoMemory();
  }
  job_init(job, &data);
  int status;
  if (setjmp(job->err.jump)) {
    snprintf(job->problem, sizeof(job->problem), "%s", job->err.message);
    status = -1;
  } else {
    status = read_header(job);
  }
  job_free(job);
  PyBuffer_Release(&data);
  PyObject *result;
  if (status != 0)
    result = PyErr_Format(PyExc_ValueError, "cannot read JPEG header: %s", job->problem);
  else
    result = Py_BuildValue("(IIsO)", job->image_height, job->image_width,
                           colorspace_name(job->colorspace), job->progressive ? Py_True : Py_False);
  PyMem_RawFree(job);
  return result;
}

static PyMethodDef methods[] = {
    {"decode_region", (PyCFunction)(void (*)(void))decode_region, METH_VARARGS | METH_KEYWORDS,
     decode_region_doc},
    {"read_header", read_header_py, METH_VARARGS, read_header_doc},
    {"resample", (PyCFunction)(void (*)(void))resample_py, METH_VARARGS | METH_KEYWORDS,
     resample_doc},
    {"resize", (PyCFunction)(void (*)(void))resize_py, METH_VARARGS | METH_KEYWORDS, resize_doc},
    {"decode_view", (PyCFunction)(void (*)(void))decode_view, METH_VARARGS | METH_KEYWORDS,
     decode_view_doc},
    {"_set_simd", set_simd, METH_O,
     "_set_simd(flag) -> previous: use the AVX2 kernels (where the CPU has them) or plain C"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "data._jpegroi",
    .m_doc = "Region-of-interest JPEG decoding with libjpeg-turbo (jpeg_crop_scanline, "
             "jpeg_skip_scanlines), and torch's antialiased bilinear uint8 resize of a window "
             "into a training view; see data/_jpegroi.c.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__jpegroi(void) {
  simd_init();
  PyObject *m = PyModule_Create(&module);
  if (m == NULL) return NULL;
  if (PyModule_AddIntConstant(m, "MARGIN_COLS", MARGIN_COLS) ||
      PyModule_AddIntConstant(m, "LIBJPEG_TURBO_VERSION", LIBJPEG_TURBO_VERSION_NUMBER)) {
    Py_DECREF(m);
    return NULL;
  }
  return m;
}
