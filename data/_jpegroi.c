/* data._jpegroi: decode only a region of a JPEG, with the system's libjpeg-turbo.
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

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

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
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "data._jpegroi",
    .m_doc = "Region-of-interest JPEG decoding with libjpeg-turbo (jpeg_crop_scanline, "
             "jpeg_skip_scanlines); see data/_jpegroi.c.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__jpegroi(void) {
  PyObject *m = PyModule_Create(&module);
  if (m == NULL) return NULL;
  if (PyModule_AddIntConstant(m, "MARGIN_COLS", MARGIN_COLS) ||
      PyModule_AddIntConstant(m, "LIBJPEG_TURBO_VERSION", LIBJPEG_TURBO_VERSION_NUMBER)) {
    Py_DECREF(m);
    return NULL;
  }
  return m;
}
