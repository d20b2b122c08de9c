/*
 * The allocator's numeric core: steps 2-6 of a focus step (clamp, candidates, budget, voluntary
 * edits, counting) over validated arrays, in a handful of passes.
 *
 * service/allocator.py owns the rules (its module docstring is the specification), the option
 * and history checks and the result types, and calls `allocate` here. This is C because the
 * same work as numpy code is ~100 array calls per request, each paying interpreter and dispatch
 * overhead that doubles whenever the CPU caches are cold, as they are after every inference.
 *
 * Deterministic: candidates are ordered by a total order (strength, then index, then collapse
 * before expand), block means are summed left to right, and no state survives a call. The GIL is
 * released while the core runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum Aggregation { MEAN, MAX, MIN };
enum Cause { THRESHOLD, BUDGET, MAKE_ROOM };
enum Reason { PROTECTED, COOLDOWN, BELOW_THRESHOLD, OVERLAP, NO_ROOM, MAX_EDITS, REASONS };
#define SPAN_LIMIT ((int64_t)1 << 62)
#define POSITION_LIMIT ((int64_t)1 << 48) /* lensnet_client.layout.POSITION_LIMIT */

/* A voluntary edit in the queue: `key` ascending = strength descending; `tie` = 2 * index +
 * expand, so the lower index and then the collapse come first. `id`: the expansion's entry or
 * the collapse's group. */
typedef struct {
    double key;
    int64_t tie;
    int32_t id;
    uint8_t expand;
} Candidate;

/* A legal collapse group by block score (ascending), ties by group id: the budget and
 * make-room order, least useful first. */
typedef struct {
    double score;
    int32_t group;
} Ranked;

typedef struct {
    uint8_t expand, cause;
    int32_t id;
} Choice;

typedef struct {
    /* inputs */
    Py_ssize_t n;
    const int64_t *lod, *pos;
    const float *raw;
    float *clamped;
    const int64_t *no_expand, *no_collapse;
    Py_ssize_t n_no_expand, n_no_collapse;
    int64_t block, w_max, max_edits, protect_recent;
    int top, aggregation;
    double tau_expand, tau_collapse;
    /* groups: start entry, block score, state */
    int32_t n_groups;
    int64_t *start;
    double *score;
    uint8_t *collapsed, *expanded_in;
    int32_t *group_of; /* per entry: the group holding it, or -1 */
    Ranked *pool;      /* legal groups, least useful first */
    int32_t n_pool, room_first;
    /* selection */
    Candidate *queue;
    Py_ssize_t n_queue;
    Choice *chosen;
    int64_t n_chosen, length, edits_left;
    /* results */
    Py_ssize_t bad_index;
    int64_t candidates_expand, clamped_expand, clamped_collapse, need, groups_cooling;
    int64_t rejected[REASONS];
} Step;

static int contains(const int64_t *sorted, Py_ssize_t size, int64_t key) {
    Py_ssize_t lo = 0, hi = size;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (sorted[mid] < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < size && sorted[lo] == key;
}

static inline int64_t node_key(int64_t lod, int64_t position) { return position * 4 + lod; }

/* ---- the queue: a binary min-heap, so only the candidates actually reached get ordered ---- */

static inline int before(const Candidate *a, const Candidate *b) {
    return a->key < b->key || (a->key == b->key && a->tie < b->tie);
}

static void sift_down(Candidate *heap, Py_ssize_t size, Py_ssize_t i) {
    Candidate item = heap[i];
    for (;;) {
        Py_ssize_t child = 2 * i + 1;
        if (child >= size)
            break;
        if (child + 1 < size && before(&heap[child + 1], &heap[child]))
            child++;
        if (!before(&heap[child], &item))
            break;
        heap[i] = heap[child];
        i = child;
    }
    heap[i] = item;
}

static Candidate pop(Candidate *heap, Py_ssize_t *size) {
    Candidate first = heap[0];
    heap[0] = heap[--*size];
    sift_down(heap, *size, 0);
    return first;
}

static int by_score(const void *a, const void *b) {
    const Ranked *x = a, *y = b;
    if (x->score != y->score)
        return x->score < y->score ? -1 : 1;
    return (x->group > y->group) - (x->group < y->group);
}

/* ---- selection state ---- */

static inline int usable(const Step *s, int32_t g) { return !(s->collapsed[g] || s->expanded_in[g]); }

static void take(Step *s, uint8_t expand, int32_t id, uint8_t cause) {
    s->chosen[s->n_chosen++] = (Choice){expand, cause, id};
    s->edits_left--;
    if (expand) {
        int32_t own = s->group_of[id];
        if (own >= 0)
            s->expanded_in[own] = 1;
        s->length += s->block - 1;
    } else {
        s->collapsed[id] = 1;
        s->length -= s->block - 1;
    }
}

/* A voluntary collapse reached in the queue: taken unless it overlaps a taken edit. */
static void offer_collapse(Step *s, int32_t g) {
    if (s->collapsed[g])
        return; /* already collapsed to make room */
    if (s->expanded_in[g])
        s->rejected[OVERLAP]++;
    else
        take(s, 0, g, THRESHOLD);
}

/* The least useful usable group other than `own` whose score is strictly below `score`, or -1. */
static int32_t room_for(Step *s, double score, int32_t own) {
    while (s->room_first < s->n_pool && !usable(s, s->pool[s->room_first].group))
        s->room_first++; /* never usable again */
    for (int32_t j = s->room_first; j < s->n_pool; j++) {
        if (s->pool[j].score >= score)
            return -1;
        if (s->pool[j].group != own && usable(s, s->pool[j].group))
            return s->pool[j].group;
    }
    return -1;
}

/* ---- the passes ---- */

/* Step 2: range check and clamp. 0, or -1 on a bad score (its index in bad_index). */
static int clamp_scores(Step *s) {
    const float *raw = s->raw;
    const int64_t *lod = s->lod;
    float *clamped = s->clamped;
    int64_t up = 0, down = 0, top = s->top;
    for (Py_ssize_t i = 0; i < s->n; i++) {
        float value = raw[i];
        if (!(fabsf(value) <= 1.0f)) { /* NaN fails too */
            s->bad_index = i;
            return -1;
        }
        int illegal = (lod[i] == 0 && value > 0) || (lod[i] == top && value < 0);
        up += illegal && value > 0;
        down += illegal && value < 0;
        clamped[i] = illegal ? 0.0f : value + 0.0f; /* -0.0 becomes 0.0 */
        s->group_of[i] = -1;
    }
    s->clamped_expand = up;
    s->clamped_collapse = down;
    return 0;
}

/* Step 3, collapse side: every complete, aligned sibling group, its block score, protection,
 * cooldown; the legal ones go to the pool. Groups never overlap, so the scan skips past each. */
static void find_groups(Step *s, const int64_t *span) {
    int64_t last = s->lod[s->n - 1];
    int64_t end_token = s->pos[s->n - 1] + span[last];
    int pow2 = (s->block & (s->block - 1)) == 0; /* B = 2^k (the usual case): alignment is a mask test */
    for (Py_ssize_t i = 0; i + s->block <= s->n; i++) {
        int64_t l = s->lod[i], first = s->pos[i];
        Py_ssize_t end = i + s->block - 1;
        if (l >= s->top || s->lod[end] != l || s->pos[end] - first != (s->block - 1) * span[l])
            continue; /* cheap tests first: an integer division costs more than the rest together */
        if (pow2 ? (first & (span[l + 1] - 1)) : (first % span[l + 1]))
            continue;
        double value;
        if (s->aggregation == MEAN) {
            double sum = 0;
            for (Py_ssize_t k = i; k <= end; k++)
                sum += s->clamped[k];
            value = sum / (double)s->block;
        } else {
            float best = s->clamped[i];
            for (Py_ssize_t k = i + 1; k <= end; k++)
                best = s->aggregation == MAX ? fmaxf(best, s->clamped[k]) : fminf(best, s->clamped[k]);
            value = best;
        }
        int32_t g = s->n_groups++;
        s->start[g] = i;
        s->score[g] = value;
        for (Py_ssize_t k = i; k <= end; k++)
            s->group_of[k] = g;
        if (first + s->block * span[l] > end_token - s->protect_recent)
            s->rejected[PROTECTED]++;
        else if (s->n_no_collapse && contains(s->no_collapse, s->n_no_collapse, node_key(l + 1, first))) {
            s->rejected[COOLDOWN]++;
            s->groups_cooling++;
        }
        else
            s->pool[s->n_pool++] = (Ranked){value, g};
        i = end;
    }
    qsort(s->pool, (size_t)s->n_pool, sizeof(Ranked), by_score);
}

/* Step 3, expand side: gists not in cooldown whose score reaches tau_expand join the queue. */
static void queue_expansions(Step *s) {
    const int64_t *lod = s->lod, *pos = s->pos;
    const float *clamped = s->clamped;
    Candidate *queue = s->queue;
    Py_ssize_t queued = s->n_queue;
    int64_t candidates = 0, cooling = 0, below = 0;
    for (Py_ssize_t i = 0; i < s->n; i++) {
        if (lod[i] < 1)
            continue;
        candidates++;
        if (s->n_no_expand && contains(s->no_expand, s->n_no_expand, node_key(lod[i], pos[i])))
            cooling++;
        else if (clamped[i] >= s->tau_expand)
            queue[queued++] = (Candidate){-(double)clamped[i], 2 * (int64_t)i + 1, (int32_t)i, 1};
        else
            below++;
    }
    s->n_queue = queued;
    s->candidates_expand = candidates;
    s->rejected[COOLDOWN] += cooling;
    s->rejected[BELOW_THRESHOLD] += below;
}

/* Steps 4-6. */
static void select_edits(Step *s) {
    /* 4. Budget: the least useful legal groups, whatever their score. */
    s->need = s->n > s->w_max ? (s->n - s->w_max + s->block - 2) / (s->block - 1) : 0;
    int64_t budget = s->need < s->max_edits ? s->need : s->max_edits;
    int32_t taken = budget < s->n_pool ? (int32_t)budget : s->n_pool;
    for (int32_t j = 0; j < taken; j++)
        take(s, 0, s->pool[j].group, BUDGET);

    /* 5. The rest of the pool: voluntary collapses join the queue, the others fall short. */
    for (int32_t j = taken; j < s->n_pool; j++) {
        int32_t g = s->pool[j].group;
        if (s->score[g] <= -s->tau_collapse)
            s->queue[s->n_queue++] = (Candidate){s->score[g], 2 * s->start[g], g, 0};
    }
    for (Py_ssize_t i = s->n_queue / 2 - 1; i >= 0; i--)
        sift_down(s->queue, s->n_queue, i);

    int64_t limit = s->w_max - (s->block - 1); /* an expansion fits while length <= limit */
    while (s->n_queue) {
        const Candidate *next = &s->queue[0];
        if (s->edits_left == 0 || (next->expand && s->edits_left == 1 && s->length > limit))
            break; /* no expansion can be taken any more (a trade needs two edits) */
        Candidate c = pop(s->queue, &s->n_queue);
        if (!c.expand) {
            offer_collapse(s, c.id);
            continue;
        }
        int32_t own = s->group_of[c.id];
        if (own >= 0 && s->collapsed[own]) {
            s->rejected[OVERLAP]++;
        } else if (s->length <= limit) {
            take(s, 1, c.id, THRESHOLD);
        } else {
            int32_t g = room_for(s, -c.key, own);
            if (g >= 0) {
                take(s, 0, g, MAKE_ROOM);
                take(s, 1, c.id, THRESHOLD);
            } else {
                s->rejected[NO_ROOM]++;
            }
        }
    }

    /* Unreached expansions: overlap if their group is collapsed by now, else out of edits. */
    for (Py_ssize_t k = 0; k < s->n_queue; k++) {
        if (s->queue[k].expand) {
            int32_t own = s->group_of[s->queue[k].id];
            s->rejected[own >= 0 && s->collapsed[own] ? OVERLAP : MAX_EDITS]++;
        }
    }
    /* Unreached collapses may still take the last edits, in queue order. */
    while (s->n_queue && s->edits_left) {
        Candidate c = pop(s->queue, &s->n_queue);
        if (!c.expand)
            offer_collapse(s, c.id);
    }
    for (Py_ssize_t k = 0; k < s->n_queue; k++) {
        int32_t g = s->queue[k].id;
        if (s->queue[k].expand)
            continue;
        if (s->expanded_in[g])
            s->rejected[OVERLAP]++;
        else if (!s->collapsed[g])
            s->rejected[MAX_EDITS]++;
    }
    /* Legal groups above the collapse threshold that no edit took. */
    for (int32_t j = taken; j < s->n_pool; j++) {
        int32_t g = s->pool[j].group;
        if (s->score[g] > -s->tau_collapse && !s->collapsed[g])
            s->rejected[BELOW_THRESHOLD]++;
    }
}

static inline int64_t edit_index(const Step *s, const Choice *c) { return c->expand ? c->id : s->start[c->id]; }

/* Insertion sort of the chosen edits by index (at most max_edits <= 1024 of them, all disjoint). */
static void sort_chosen(Step *s) {
    for (int64_t k = 1; k < s->n_chosen; k++) {
        Choice item = s->chosen[k];
        int64_t j = k - 1;
        while (j >= 0 && edit_index(s, &s->chosen[j]) > edit_index(s, &item)) {
            s->chosen[j + 1] = s->chosen[j];
            j--;
        }
        s->chosen[j + 1] = item;
    }
}

/* ---- Python binding ---- */

/* span[l] = B ** l for l = 0 .. max_lod + 1 (the parent span of the top level included). */
static int spans(long long block, int top, int64_t *span) {
    if (block < 2 || top < 1 || top > 3) {
        PyErr_SetString(PyExc_ValueError, "expected block_size >= 2 and max_lod 1..3");
        return -1;
    }
    span[0] = 1;
    for (int l = 1; l <= top + 1; l++) {
        if (span[l - 1] > SPAN_LIMIT / block) {
            PyErr_SetString(PyExc_ValueError, "block_size ** (max_lod + 1) overflows int64");
            return -1;
        }
        span[l] = span[l - 1] * block;
    }
    return 0;
}

/* A contiguous 1-D buffer of `itemsize`-byte items whose struct code is one of `codes`. */
static int get_array(PyObject *obj, Py_buffer *view, const char *name, const char *codes, Py_ssize_t itemsize,
                     int writable) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    const char *format = view->format ? view->format : "B";
    if (strchr("<=@", format[0]))
        format++; /* native or little-endian: the only byte orders numpy gives us here */
    if (view->ndim != 1 || view->itemsize != itemsize || strlen(format) != 1 || !strchr(codes, format[0])) {
        PyErr_Format(PyExc_TypeError, "%s: expected a contiguous 1-D array of %zd-byte '%s' items, got '%s'", name,
                     itemsize, codes, view->format ? view->format : "B");
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int run(Step *s, const int64_t *span) {
    Py_ssize_t n = s->n, groups = n / s->block + 1;
    s->start = malloc(sizeof(int64_t) * groups);
    s->score = malloc(sizeof(double) * groups);
    s->collapsed = calloc(groups, 1);
    s->expanded_in = calloc(groups, 1);
    s->pool = malloc(sizeof(Ranked) * groups);
    s->group_of = malloc(sizeof(int32_t) * n);
    s->queue = malloc(sizeof(Candidate) * (n + groups));
    s->chosen = malloc(sizeof(Choice) * s->max_edits);
    if (!(s->start && s->score && s->collapsed && s->expanded_in && s->pool && s->group_of && s->queue &&
          s->chosen))
        return -1;
    if (clamp_scores(s) == 0) {
        find_groups(s, span);
        queue_expansions(s);
        select_edits(s);
        sort_chosen(s);
    }
    return 0;
}

static void release(Step *s) {
    free(s->start);
    free(s->score);
    free(s->collapsed);
    free(s->expanded_in);
    free(s->pool);
    free(s->group_of);
    free(s->queue);
    free(s->chosen);
}

static PyObject *result(const Step *s) {
    PyObject *edits = PyList_New((Py_ssize_t)s->n_chosen);
    if (!edits)
        return NULL;
    for (int64_t k = 0; k < s->n_chosen; k++) {
        const Choice *c = &s->chosen[k];
        int64_t index = edit_index(s, c);
        double score = c->expand ? (double)s->clamped[index] : s->score[c->id];
        PyObject *edit = Py_BuildValue("(OLLLdi)", c->expand ? Py_True : Py_False, (long long)index,
                                       (long long)s->lod[index], (long long)s->pos[index], score, (int)c->cause);
        if (!edit) {
            Py_DECREF(edits);
            return NULL;
        }
        PyList_SET_ITEM(edits, (Py_ssize_t)k, edit);
    }
    const int64_t *r = s->rejected;
    return Py_BuildValue("(nNL(LLLLLLLLLLLLL))", s->bad_index, edits, (long long)s->length,
                         (long long)s->candidates_expand, (long long)s->n_groups, (long long)s->clamped_expand,
                         (long long)s->clamped_collapse, (long long)r[PROTECTED], (long long)r[COOLDOWN],
                         (long long)r[BELOW_THRESHOLD], (long long)r[OVERLAP], (long long)r[NO_ROOM],
                         (long long)r[MAX_EDITS], (long long)s->need, (long long)s->n_pool,
                         (long long)s->groups_cooling);
}

PyDoc_STRVAR(allocate_doc,
             "allocate(lod, positions, scores, clamped, no_expand, no_collapse, block_size, max_lod, w_max,\n"
             "         tau_expand, tau_collapse, max_edits, aggregation, protect_recent)\n"
             "--\n\n"
             "One focus step over a validated layout (int64 `lod`/`positions`), float32 `scores` and sorted\n"
             "int64 cooldown node keys; writes the clamped scores into `clamped` (float32, writable).\n"
             "`aggregation`: 0 mean, 1 max, 2 min. Returns (bad_index, edits, length_after, counts):\n"
             "bad_index >= 0 names the first score that is not finite in [-1, 1] (then nothing else is\n"
             "computed); edits are (expand, index, level, position, score, cause) ordered by index, cause 0\n"
             "threshold, 1 budget, 2 make_room; counts are (candidates_expand, candidates_collapse,\n"
             "clamped_expand, clamped_collapse, protected, cooldown, threshold, overlap, budget, max_edits,\n"
             "need, pool, groups_cooling).");

static PyObject *allocate(PyObject *module, PyObject *args, PyObject *kwargs) {
    (void)module;
    static char *keywords[] = {"lod",        "positions",  "scores",    "clamped",     "no_expand",
                               "no_collapse", "block_size", "max_lod",   "w_max",       "tau_expand",
                               "tau_collapse", "max_edits", "aggregation", "protect_recent", NULL};
    static const char *names[] = {"lod", "positions", "scores", "clamped", "no_expand", "no_collapse"};
    enum { ARRAYS = 6 };
    PyObject *objects[ARRAYS];
    long long block, w_max, max_edits, protect_recent;
    int top, aggregation;
    double tau_expand, tau_collapse;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOLiLddLiL", keywords, &objects[0], &objects[1],
                                     &objects[2], &objects[3], &objects[4], &objects[5], &block, &top, &w_max,
                                     &tau_expand, &tau_collapse, &max_edits, &aggregation, &protect_recent))
        return NULL;
    if (max_edits < 1 || max_edits > 1024 || aggregation < MEAN || aggregation > MIN) {
        PyErr_SetString(PyExc_ValueError, "allocate: expected max_edits 1..1024, aggregation 0..2");
        return NULL;
    }
    int64_t span[5] = {1};
    if (spans(block, top, span) < 0)
        return NULL;
    Py_buffer views[ARRAYS];
    int held = 0;
    PyObject *out = NULL;
    for (; held < ARRAYS; held++) {
        int floats = held == 2 || held == 3;
        if (get_array(objects[held], &views[held], names[held], floats ? "f" : "lq", floats ? 4 : 8, held == 3) < 0)
            goto done;
    }
    Py_ssize_t n = views[0].shape[0];
    if (n < 1 || n > INT32_MAX / 2 || views[1].shape[0] != n || views[2].shape[0] != n || views[3].shape[0] != n) {
        PyErr_Format(PyExc_ValueError, "allocate: lod, positions, scores and clamped need one length in 1..%d",
                     INT32_MAX / 2);
        goto done;
    }
    const int64_t *lod = views[0].buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (lod[i] < 0 || lod[i] > top) { /* validate_layout rules this out; never index past span[] */
            PyErr_Format(PyExc_ValueError, "allocate: lod[%zd] = %lld is outside 0..%d", i, (long long)lod[i], top);
            goto done;
        }
    }
    Step s = {
        .n = n,
        .lod = lod,
        .pos = views[1].buf,
        .raw = views[2].buf,
        .clamped = views[3].buf,
        .no_expand = views[4].buf,
        .n_no_expand = views[4].shape[0],
        .no_collapse = views[5].buf,
        .n_no_collapse = views[5].shape[0],
        .block = block,
        .w_max = w_max,
        .max_edits = max_edits,
        .protect_recent = protect_recent,
        .top = top,
        .aggregation = aggregation,
        .tau_expand = tau_expand,
        .tau_collapse = tau_collapse,
        .edits_left = max_edits,
        .length = n,
        .bad_index = -1,
    };
    int status;
    Py_BEGIN_ALLOW_THREADS;
    status = run(&s, span);
    Py_END_ALLOW_THREADS;
    if (status < 0)
        PyErr_NoMemory();
    else
        out = result(&s);
    release(&s);
done:
    while (held-- > 0)
        PyBuffer_Release(&views[held]);
    return out;
}

PyDoc_STRVAR(layout_is_valid_doc,
             "layout_is_valid(lod, positions, block_size, max_lod) -> bool\n"
             "--\n\n"
             "lensnet_client.layout.validate_layout's rules over int64 `lod`/`positions` (one length >= 1) in\n"
             "one pass: 0 <= lod <= max_lod, 0 <= position < 2**48, alignment and contiguity. False names no\n"
             "rule: validate_layout words the error.");

static PyObject *layout_is_valid(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *objects[2];
    long long block;
    int top;
    if (!PyArg_ParseTuple(args, "OOLi", &objects[0], &objects[1], &block, &top))
        return NULL;
    int64_t span[5] = {1};
    if (spans(block, top, span) < 0)
        return NULL;
    Py_buffer views[2];
    if (get_array(objects[0], &views[0], "lod", "lq", 8, 0) < 0)
        return NULL;
    if (get_array(objects[1], &views[1], "positions", "lq", 8, 0) < 0) {
        PyBuffer_Release(&views[0]);
        return NULL;
    }
    const int64_t *lod = views[0].buf, *pos = views[1].buf;
    Py_ssize_t n = views[0].shape[0];
    int valid = n >= 1 && views[1].shape[0] == n;
    for (Py_ssize_t i = 0; valid && i < n; i++) {
        int64_t l = lod[i], p = pos[i];
        valid = l >= 0 && l <= top && p >= 0 && p < POSITION_LIMIT && p % span[l] == 0 &&
                (i + 1 == n || p + span[l] == pos[i + 1]);
    }
    PyBuffer_Release(&views[0]);
    PyBuffer_Release(&views[1]);
    return PyBool_FromLong(valid);
}

static PyMethodDef methods[] = {
    {"allocate", (PyCFunction)(void (*)(void))allocate, METH_VARARGS | METH_KEYWORDS, allocate_doc},
    {"layout_is_valid", layout_is_valid, METH_VARARGS, layout_is_valid_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "service._allocator", "The allocator's numeric core (see service/allocator.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__allocator(void) { return PyModule_Create(&module); }
