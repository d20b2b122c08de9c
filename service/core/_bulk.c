/*
 * Bulk kernels of the request path, one pass each:
 *
 * - float16 <-> float32 conversion (codec: embeddings are converted to the graph's dtype while
 *   the body streams in). numpy converts float16 at ~1.7 ns an element here; F16C does 8 per
 *   instruction, so the conversion hides in the time the body takes to arrive.
 * - bucket counts of scores by LOD (telemetry: the score histogram of a whole WC in one pass).
 * - /v1/feedback bodies of the usual form as columns (ids, edits, ΔNLLs), without a Python object
 *   per item or field (`benchmarks.feedback` times it against the body's pydantic model). Anything else
 *   (escapes, other fields, key repeats, numbers at 64-bit edges) is left to the body's pydantic
 *   model, which decides it and words its errors. It builds Python strings, so it holds the GIL;
 *   the array kernels release it.
 *
 * Conversions round to nearest even and keep inf and subnormals, bit for bit like numpy's astype;
 * NaN stays NaN (its payload bits may differ). Sources may be unaligned (a chunk of a request body
 * splits an array anywhere): every load is unaligned; targets must be aligned to their items.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <locale.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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

/* ---- /v1/feedback bodies: the usual one as columns, anything else left to the model ---- */

#if defined(__GLIBC__)
static locale_t c_locale; /* numbers read as JSON writes them, whatever LC_NUMERIC says */
#endif

typedef struct {
    const char *at, *end;
} Cursor;

static void skip_space(Cursor *c) {
    while (c->at < c->end && (*c->at == ' ' || *c->at == '\t' || *c->at == '\n' || *c->at == '\r'))
        c->at++;
}

/* `text` (with its quotes) next, after any white space. */
static int take(Cursor *c, const char *text, size_t length) {
    skip_space(c);
    if ((size_t)(c->end - c->at) < length)
        return 0;
    for (size_t k = 0; k < length; k++)
        if (c->at[k] != text[k])
            return 0;
    c->at += length;
    return 1;
}

/* A JSON number's extent: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?; 0 if there is none.
 * `integral` says whether it had neither fraction nor exponent. */
static Py_ssize_t number_length(const char *at, const char *end, int *integral) {
    const char *p = at;
    if (p < end && *p == '-')
        p++;
    if (p < end && *p == '0')
        p++;
    else if (p < end && *p >= '1' && *p <= '9')
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    else
        return 0;
    *integral = 1;
    if (p < end && *p == '.') {
        *integral = 0;
        const char *digits = ++p;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
        if (p == digits)
            return 0;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        *integral = 0;
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            p++;
        const char *digits = p;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
        if (p == digits)
            return 0;
    }
    return p - at;
}

enum { MAX_NUMBER_CHARS = 64, MAX_EDIT_DIGITS = 18 }; /* 18 digits < 2**62: no edit index needs a cap */

typedef struct {
    PyObject *ids;
    int64_t *edits;
    double *deltas;
    Py_ssize_t n, capacity;
} Columns;

static int grow(Columns *columns) {
    Py_ssize_t capacity = columns->capacity ? 2 * columns->capacity : 64;
    int64_t *edits = PyMem_Realloc(columns->edits, (size_t)capacity * sizeof *edits);
    if (edits)
        columns->edits = edits;
    double *deltas = PyMem_Realloc(columns->deltas, (size_t)capacity * sizeof *deltas);
    if (deltas)
        columns->deltas = deltas;
    if (!edits || !deltas) {
        PyErr_NoMemory();
        return -1;
    }
    columns->capacity = capacity;
    return 0;
}

/* A string of printable ASCII and DEL, no escapes: the bytes between its quotes. Any other
 * string (escapes, control bytes, non-ASCII) is not the usual form: 0. */
static int take_string(Cursor *c, const char **start, Py_ssize_t *length) {
    if (!take(c, "\"", 1))
        return 0;
    *start = c->at;
    while (c->at < c->end && *c->at != '"') {
        unsigned char byte = (unsigned char)*c->at;
        if (byte < 0x20 || byte > 0x7f || byte == '\\')
            return 0;
        c->at++;
    }
    if (c->at == c->end)
        return 0;
    *length = c->at++ - *start;
    return 1;
}

/* A key (a string as above) and the colon after it. */
static int take_key(Cursor *c, const char **key, Py_ssize_t *length) {
    return take_string(c, key, length) && take(c, ":", 1);
}

static int is_key(const char *key, Py_ssize_t length, const char *name) {
    return (size_t)length == strlen(name) && memcmp(key, name, (size_t)length) == 0;
}

/* A finite JSON number as the double Python's float() gives for it (both round correctly; glibc's
 * strtod_l with the C locale also skips the x87 control-word switch PyOS_string_to_double makes
 * on every call). 1 taken, 0 not a finite number, -1 error. */
static int take_double(Cursor *c, double *value) {
    int integral;
    skip_space(c);
    Py_ssize_t length = number_length(c->at, c->end, &integral);
    if (!length || length > MAX_NUMBER_CHARS)
        return 0;
    char text[MAX_NUMBER_CHARS + 1];
    memcpy(text, c->at, (size_t)length);
    text[length] = '\0';
#if defined(__GLIBC__)
    *value = strtod_l(text, NULL, c_locale);
#else
    *value = PyOS_string_to_double(text, NULL, NULL);
    if (*value == -1.0 && PyErr_Occurred())
        return -1;
#endif
    c->at += length;
    if (integral && *value == 0)
        *value = 0.0; /* an integer: -0 is the integer 0 to the model, so +0.0 */
    return isfinite(*value) ? 1 : 0;
}

/* One item: its three fields in any order, each once. 1 taken, 0 not the usual form, -1 error. */
static int take_item(Cursor *c, Columns *columns, Py_ssize_t max_id_length, PyObject **last_id) {
    int seen = 0; /* bits: decision_id, edit, delta_nll */
    if (!take(c, "{", 1))
        return 0;
    for (int field = 0; field < 3; field++) {
        const char *key;
        Py_ssize_t key_length;
        if ((field && !take(c, ",", 1)) || !take_key(c, &key, &key_length))
            return 0;
        if (is_key(key, key_length, "decision_id") && !(seen & 1)) {
            seen |= 1;
            const char *start;
            Py_ssize_t length;
            if (!take_string(c, &start, &length) || length > max_id_length)
                return 0;
            if (*last_id && PyUnicode_GET_LENGTH(*last_id) == length &&
                memcmp(PyUnicode_DATA(*last_id), start, (size_t)length) == 0) {
                Py_INCREF(*last_id); /* a decision's edits usually come together: one string for them */
            } else {
                PyObject *id = PyUnicode_DecodeASCII(start, length, NULL);
                if (!id)
                    return -1;
                *last_id = id;
            }
            if (PyList_Append(columns->ids, *last_id) < 0) {
                Py_DECREF(*last_id);
                return -1;
            }
            Py_DECREF(*last_id); /* the list holds it */
        } else if (is_key(key, key_length, "edit") && !(seen & 2)) {
            seen |= 2;
            int integral;
            skip_space(c);
            Py_ssize_t length = number_length(c->at, c->end, &integral);
            if (!length || !integral || *c->at == '-' || length > MAX_EDIT_DIGITS)
                return 0; /* fractions, exponents, signs and 64-bit edges: the model decides */
            int64_t edit = 0;
            for (Py_ssize_t k = 0; k < length; k++)
                edit = 10 * edit + (c->at[k] - '0');
            columns->edits[columns->n] = edit;
            c->at += length;
        } else if (is_key(key, key_length, "delta_nll") && !(seen & 4)) {
            seen |= 4;
            int taken = take_double(c, &columns->deltas[columns->n]);
            if (taken <= 0)
                return taken;
        } else {
            return 0;
        }
    }
    if (!take(c, "}", 1))
        return 0;
    columns->n++;
    return 1;
}

static PyObject *py_feedback_columns(PyObject *module, PyObject *args) {
    (void)module;
    Py_buffer view;
    Py_ssize_t max_items, max_id_length;
    if (!PyArg_ParseTuple(args, "y*nn", &view, &max_items, &max_id_length))
        return NULL;
    Columns columns = {PyList_New(0), NULL, NULL, 0, 0};
    PyObject *result = NULL, *last_id = NULL;
    Cursor c = {view.buf, (const char *)view.buf + view.len};
    int usual = 0;
    if (!columns.ids)
        goto done;
    if (!take(&c, "{", 1) || !take(&c, "\"items\"", 7) || !take(&c, ":", 1) || !take(&c, "[", 1))
        goto done;
    do {
        if (columns.n == max_items)
            goto done;
        if (columns.n == columns.capacity && grow(&columns) < 0)
            goto done;
        int taken = take_item(&c, &columns, max_id_length, &last_id);
        if (taken <= 0)
            goto done;
    } while (take(&c, ",", 1));
    if (!take(&c, "]", 1) || !take(&c, "}", 1))
        goto done;
    skip_space(&c);
    usual = c.at == c.end;
done:
    if (usual) {
        PyObject *edits = PyByteArray_FromStringAndSize((const char *)columns.edits, columns.n * 8);
        PyObject *deltas = PyByteArray_FromStringAndSize((const char *)columns.deltas, columns.n * 8);
        if (edits && deltas)
            result = PyTuple_Pack(3, columns.ids, edits, deltas);
        Py_XDECREF(edits);
        Py_XDECREF(deltas);
    } else if (!PyErr_Occurred()) {
        result = Py_NewRef(Py_None);
    }
    Py_XDECREF(columns.ids);
    PyMem_Free(columns.edits);
    PyMem_Free(columns.deltas);
    PyBuffer_Release(&view);
    return result;
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
    {"feedback_columns", py_feedback_columns, METH_VARARGS,
     "feedback_columns(body, max_items, max_id_length) -> (ids, edits, deltas) | None: a /v1/feedback\n"
     "body of the usual form ({\"items\": [...]}, 1 ... max_items items of exactly decision_id (printable\n"
     "ASCII or DEL, no escapes, at most max_id_length), edit (an unsigned integer of at most 18 digits) and\n"
     "a finite delta_nll of at most 64 characters) as a list of str and the bytes of int64 and float64\n"
     "columns in native byte order; None for any other body (valid or not), which the caller's model decides."},
    {"set_vector", py_set_vector, METH_O,
     "set_vector(on) -> bool: use the F16C path when the CPU has it (the default); False forces the\n"
     "portable path. Returns whether the vector path is in use."},
    {NULL, NULL, 0, NULL},
};

#if defined(__GLIBC__)
static void free_module(void *unused) {
    (void)unused;
    if (c_locale) {
        freelocale(c_locale);
        c_locale = (locale_t)0;
    }
}
#else
#define free_module NULL
#endif

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "service._bulk", "Bulk kernels: float16 conversion, bucket counts, feedback columns.",
    -1, methods, NULL, NULL, NULL, free_module,
};

PyMODINIT_FUNC PyInit__bulk(void) {
#if defined(__GLIBC__)
    c_locale = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
    if (!c_locale)
        return PyErr_NoMemory();
#endif
#ifdef HAVE_X86
    use_vector = have_f16c();
#endif
    return PyModule_Create(&module);
}
