/*
 * Bulk array kernels of the request path, one pass each, GIL released:
 *
 * - float16 <-> float32 conversion (codec: embeddings are converted to the graph's dtype while
 *   the body streams in). numpy converts float16 at ~1.7 ns an element here; F16C does 8 per
 *   instruction, so the conversion hides in the time the body takes to arrive.
 * - bucket counts of scores by LOD (telemetry: the score histogram of a whole WC in one pass).
 *
 * Conversions round to nearest even and keep inf and subnormals, bit for bit like numpy's astype;
 * NaN stays NaN (its payload bits may differ). Sources may be unaligned (a chunk of a request body
 * splits an array anywhere): every load is unaligned; targets must be aligned to their items.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

/* ---- portable scalar conversions (IEEE 754 binary16 <-> binary32) ---- */

static inline uint16_t load_u16(const unsigned char *p) {
    uint16_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float load_f32(const unsigned char *p) {
    float v;
    memcpy(&v, p, sizeof v);
    return v;
}

static float half_to_float_scalar(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
    if (exponent == 0x1f) { /* inf or NaN: keep the payload */
        bits = sign | 0x7f800000 | (mantissa << 13);
    } else if (exponent) { /* normal */
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa) { /* subnormal: normalise */
        int shift = 0;
        while (!(mantissa & 0x400)) {
            mantissa <<= 1;
            shift++;
        }
        bits = sign | ((uint32_t)(113 - shift) << 23) | ((mantissa & 0x3ff) << 13);
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static uint16_t float_to_half_scalar(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000);
    uint32_t exponent = (bits >> 23) & 0xff, mantissa = bits & 0x7fffff;
    if (exponent == 0xff) /* inf, or NaN (kept a NaN: quiet bit set) */
        return sign | 0x7c00 | (mantissa ? 0x200 | (uint16_t)(mantissa >> 13) : 0);
    int32_t e = (int32_t)exponent - 127 + 15;
    if (e >= 0x1f) /* overflow */
        return sign | 0x7c00;
    if (e <= 0) { /* subnormal half, or zero */
        if (e < -10)
            return sign;
        mantissa |= 0x800000;
        uint32_t shift = (uint32_t)(14 - e), half = mantissa >> shift, rest = mantissa & ((1u << shift) - 1);
        uint32_t midpoint = 1u << (shift - 1);
        if (rest > midpoint || (rest == midpoint && (half & 1)))
            half++;
        return sign | (uint16_t)half;
    }
    uint32_t half = ((uint32_t)e << 10) | (mantissa >> 13), rest = mantissa & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (half & 1)))
        half++; /* may carry into the exponent, up to inf: that is the correct rounding */
    return sign | (uint16_t)half;
}

/* ---- the conversion: F16C for whole groups of 8 where the CPU has it, the scalar code for the rest ---- */

typedef enum { HALF_TO_FLOAT, FLOAT_TO_HALF } Direction;

static int use_vector = 0; /* set at import: F16C present (and not disabled for tests) */

#ifdef HAVE_X86
/* Items converted: the largest multiple of 8 <= n. */
__attribute__((target("avx,f16c"))) static Py_ssize_t convert_f16c(const unsigned char *src, char *out, Py_ssize_t n,
                                                                   Direction direction) {
    Py_ssize_t i = 0;
    if (direction == HALF_TO_FLOAT) {
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps((float *)out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 2 * i))));
    } else {
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)((uint16_t *)out + i),
                             _mm256_cvtps_ph(_mm256_loadu_ps((const float *)(src + 4 * i)), _MM_FROUND_TO_NEAREST_INT));
    }
    return i;
}

static int have_f16c(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
}
#endif

static void convert_items(const unsigned char *src, char *out, Py_ssize_t n, Direction direction) {
    Py_ssize_t i = 0;
#ifdef HAVE_X86
    if (use_vector)
        i = convert_f16c(src, out, n, direction);
#endif
    if (direction == HALF_TO_FLOAT) {
        for (; i < n; i++)
            ((float *)out)[i] = half_to_float_scalar(load_u16(src + 2 * i));
    } else {
        for (; i < n; i++)
            ((uint16_t *)out)[i] = float_to_half_scalar(load_f32(src + 4 * i));
    }
}

/* ---- Python binding ---- */

/* A C-contiguous buffer of `itemsize`-byte items (any shape: conversions see it flat). */
static int get_items(PyObject *obj, Py_buffer *view, const char *name, Py_ssize_t itemsize, int writable) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    if (view->itemsize != itemsize) {
        PyErr_Format(PyExc_TypeError, "%s: expected %zd-byte items, got %zd-byte '%s'", name, itemsize,
                     view->itemsize, view->format ? view->format : "B");
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *convert(PyObject *args, Direction direction) {
    PyObject *source, *target;
    Py_ssize_t start = 0;
    if (!PyArg_ParseTuple(args, "OO|n", &source, &target, &start))
        return NULL;
    Py_buffer src, dst;
    Py_ssize_t in_size = direction == HALF_TO_FLOAT ? 2 : 4, out_size = 6 - in_size;
    if (PyObject_GetBuffer(source, &src, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (get_items(target, &dst, "target", out_size, 1) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    Py_ssize_t n = src.len / in_size, room = dst.len / out_size;
    if (src.len % in_size) {
        PyErr_Format(PyExc_ValueError, "source: expected whole %zd-byte items, got %zd bytes", in_size, src.len);
    } else if ((uintptr_t)dst.buf % (uintptr_t)out_size) {
        PyErr_SetString(PyExc_ValueError, "target: expected a buffer aligned to its items");
    } else if (start < 0 || start > room || n > room - start) {
        PyErr_Format(PyExc_ValueError, "target: expected room for %zd items from item %zd, got %zd items", n, start,
                     room);
    } else {
        char *out = (char *)dst.buf + start * out_size;
        Py_BEGIN_ALLOW_THREADS;
        convert_items(src.buf, out, n, direction);
        Py_END_ALLOW_THREADS;
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_half_to_float(PyObject *module, PyObject *args) {
    (void)module;
    return convert(args, HALF_TO_FLOAT);
}

static PyObject *py_float_to_half(PyObject *module, PyObject *args) {
    (void)module;
    return convert(args, FLOAT_TO_HALF);
}

/* The largest float <= `edge`: for a float v, `edge < v` exactly when `limit < v` (no float lies
 * between the two), so the comparisons below run in float, 8 or 16 lanes at a time. */
static float float_limit(double edge) {
    float limit = (float)edge;
    if (!((double)limit > edge)) /* exact, rounded down, or NaN */
        return limit;
    uint32_t bits;
    memcpy(&bits, &limit, sizeof bits);
    bits = limit > 0 ? bits - 1 : limit == 0 ? 0x80000001u : bits + 1; /* one float down */
    memcpy(&limit, &bits, sizeof limit);
    return limit;
}

enum { BUCKET_BLOCK = 256, MAX_EDGES = 64 };

static PyObject *py_bucket_counts(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *objects[4];
    if (!PyArg_ParseTuple(args, "OOOO", &objects[0], &objects[1], &objects[2], &objects[3]))
        return NULL;
    static const char *names[] = {"values", "groups", "edges", "counts"};
    static const Py_ssize_t sizes[] = {4, 8, 8, 8};
    Py_buffer views[4];
    int held = 0;
    for (; held < 4; held++)
        if (get_items(objects[held], &views[held], names[held], sizes[held], held == 3) < 0)
            goto done;
    const float *values = views[0].buf;
    const int64_t *groups = views[1].buf;
    const double *edges = views[2].buf;
    int64_t *counts = views[3].buf;
    Py_ssize_t n = views[0].len / 4, n_edges = views[2].len / 8, width = n_edges + 1, slots = views[3].len / 8;
    if (views[1].len / 8 != n) {
        PyErr_SetString(PyExc_ValueError, "groups: expected one per value");
        goto done;
    }
    if (n_edges > MAX_EDGES) {
        PyErr_Format(PyExc_ValueError, "edges: expected at most %d, got %zd", MAX_EDGES, n_edges);
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) { /* bounds first, so the pass below cannot write outside counts */
        if (groups[i] < 0 || groups[i] >= slots / width) {
            PyErr_Format(PyExc_ValueError, "groups[%zd] = %lld: outside the %zd rows of counts", i,
                         (long long)groups[i], slots / width);
            goto done;
        }
    }
    float limits[MAX_EDGES];
    for (Py_ssize_t j = 0; j < n_edges; j++)
        limits[j] = float_limit(edges[j]);
    Py_BEGIN_ALLOW_THREADS;
    /* The first edge >= value is its `le` bucket (n_edges: +Inf): with sorted edges, the number of
     * edges below it. Counted without branches (scores are random, a search mispredicts), a block
     * of values per edge so that the compiler vectorises the comparisons; a short last block is
     * padded with NaN, which counts no edge below it and is not counted. */
    float block[BUCKET_BLOCK];
    int32_t below[BUCKET_BLOCK];
    for (Py_ssize_t first = 0; first < n; first += BUCKET_BLOCK) {
        Py_ssize_t m = n - first < BUCKET_BLOCK ? n - first : BUCKET_BLOCK;
        const float *chunk = values + first;
        if (m < BUCKET_BLOCK) {
            memcpy(block, chunk, (size_t)m * sizeof *block);
            for (Py_ssize_t i = m; i < BUCKET_BLOCK; i++)
                block[i] = __builtin_nanf("");
            chunk = block;
        }
        memset(below, 0, sizeof below);
        for (Py_ssize_t j = 0; j < n_edges; j++) {
            float limit = limits[j];
            for (int i = 0; i < BUCKET_BLOCK; i++)
                below[i] += chunk[i] > limit;
        }
        for (Py_ssize_t i = 0; i < m; i++)
            counts[groups[first + i] * width + below[i]]++;
    }
    Py_END_ALLOW_THREADS;
done:
    while (held-- > 0)
        PyBuffer_Release(&views[held]);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_set_vector(PyObject *module, PyObject *arg) {
    (void)module;
    int wanted = PyObject_IsTrue(arg);
    if (wanted < 0)
        return NULL;
#ifdef HAVE_X86
    use_vector = wanted && have_f16c();
#else
    use_vector = 0;
#endif
    return PyBool_FromLong(use_vector);
}

static PyMethodDef methods[] = {
    {"half_to_float", py_half_to_float, METH_VARARGS,
     "half_to_float(source, target, start=0): the float16 values in the bytes of `source` (any contiguous\n"
     "buffer) into items start, start + 1, ... of the float32 buffer `target`."},
    {"float_to_half", py_float_to_half, METH_VARARGS,
     "float_to_half(source, target, start=0): the float32 values in the bytes of `source` (any contiguous\n"
     "buffer) into items start, start + 1, ... of the float16 buffer `target`."},
    {"bucket_counts", py_bucket_counts, METH_VARARGS,
     "bucket_counts(values, groups, edges, counts): for float32 `values` with int64 `groups`, add 1 to\n"
     "counts[groups[i], j] (int64, len(edges) + 1 columns) for the first of the sorted float64 `edges`\n"
     ">= values[i] (j = len(edges) when none is)."},
    {"set_vector", py_set_vector, METH_O,
     "set_vector(on) -> bool: use the F16C path when the CPU has it (the default); False forces the\n"
     "portable path. Returns whether the vector path is in use."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "service._bulk", "Bulk array kernels: float16 conversion, bucket counts.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__bulk(void) {
#ifdef HAVE_X86
    use_vector = have_f16c();
#endif
    return PyModule_Create(&module);
}
