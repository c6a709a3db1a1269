/* balefs._native: the block engine, the per-byte work of reading blocks off local nodes.
 *
 * It reads the exact on-node format of balefs/storage/codec.py (a 32-byte header: magic "BALE",
 * version, flags, reserved, raw length, stored length, seeded xxh3-64 of the raw bytes, xxh3-64
 * of the header's first 24 bytes; then the payload, lz4-frame compressed under FLAG_LZ4; under
 * FLAG_GROWING the file may hold more than the stored length, which is ignored) and applies the
 * same checks in the same order, so a block is either the same bytes the Python codec returns
 * or an error. Everything between taking the job list and building the results runs with the
 * GIL released, on a few threads of its own.
 *
 * Entry points (see balefs/storage/native.py for the Python side):
 *   decode(blob, volume, chunk, idx, limit) -> bytes             one block already in memory
 *   read_blocks(jobs, volume, threads) -> list                    many block files, in parallel
 *       jobs: (path, chunk, idx, limit, targets) with targets None (the result is the block's raw
 *       bytes, which must be exactly `limit` long: the length metadata books) or a list of (writable buffer, offset in it, start, end in the block) that the raw
 *       bytes are scattered into (the result is None); a failed job's result is (errno, message),
 *       errno 0 for a corrupt block. A job with targets reads its file with O_DIRECT where the
 *       filesystem allows (a bulk load's one-off read); one without reads into its result buffered.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blockcodec.h"

#define MAX_THREADS 64

/* -- errors ------------------------------------------------------------------------------------- */

static PyObject *DecodeError; /* balefs._native.DecodeError: the Python side makes it a CorruptBlockError */

/* -- decode(blob, volume, chunk, idx, limit) ------------------------------------------------------ */

static PyObject *py_decode(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer blob;
    const char *volume;
    long long chunk, idx;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "y*sLLn", &blob, &volume, &chunk, &idx, &limit))
        return NULL;
    char msg[MSG_LEN];
    header_t hd;
    size_t len = 0, out_len = 0;
    const uint8_t *data = blob.buf;
    PyObject *out = NULL;
    if (limit < 0)
        limit = 0;
    if (parse_header(data, (size_t)blob.len, &hd, msg) || payload_length(&hd, (size_t)blob.len - HEADER_SIZE, &len, msg) ||
        output_length(&hd, (size_t)limit, &out_len, msg))
        goto corrupt;
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)out_len);
    if (out == NULL)
        goto fail;
    int bad;
    uint64_t seed = block_seed(volume, chunk, idx);
    Py_BEGIN_ALLOW_THREADS
    uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(out);
    if (!(hd.flags & FLAG_LZ4))
        memcpy(dst, data + HEADER_SIZE, len);
    bad = finish_block(&hd, data + HEADER_SIZE, len, dst, out_len, seed, msg);
    Py_END_ALLOW_THREADS
    if (bad)
        goto corrupt;
    PyBuffer_Release(&blob);
    return out;
corrupt:
    PyErr_SetString(DecodeError, msg);
fail:
    Py_XDECREF(out);
    PyBuffer_Release(&blob);
    return NULL;
}

/* -- read_blocks(jobs, volume, threads) ----------------------------------------------------------- */

typedef struct {
    uint8_t *dst;
    size_t dst_len, at, lo, hi;
} target_t;

typedef struct {
    char *path;
    long long chunk, idx;
    size_t limit;
    target_t *targets;
    Py_ssize_t ntargets;
    Py_buffer *views; /* one per target: released with the GIL held */
    PyObject *bytes;  /* the result when there are no targets */
    int err;          /* errno of a failed read; 0 with msg set for a corrupt block */
    int failed;
    char msg[MSG_LEN];
} job_t;

typedef struct {
    job_t *jobs;
    Py_ssize_t n;
    const char *volume;
    Py_ssize_t next;
    pthread_mutex_t lock;
} batch_t;

static void fail_errno(job_t *j, const char *what) {
    j->failed = 1;
    j->err = errno ? errno : EIO;
    snprintf(j->msg, MSG_LEN, "%s: %s", what, strerror(j->err));
}

static void fail_corrupt(job_t *j) {
    j->failed = 1;
    j->err = 0;
}

#define PAGE 4096

/* One page-aligned buffer per thread, kept between jobs: a fresh 4 MiB buffer per block would cost
 * a thousand page faults and the kernel's zeroing of every page (more than the read itself). */
typedef struct {
    void *buf[2];
    size_t cap[2];
} scratch_t;

enum { FILE_BUF, RAW_BUF }; /* a whole block file; its decoded bytes */

static pthread_key_t scratch_key;

static void scratch_free(void *p) {
    scratch_t *s = p;
    free(s->buf[FILE_BUF]);
    free(s->buf[RAW_BUF]);
    free(s);
}

/* The calling thread's scratch buffer `slot`, at least `need` bytes; NULL when out of memory. */
static uint8_t *scratch(int slot, size_t need) {
    scratch_t *s = pthread_getspecific(scratch_key);
    if (s == NULL) {
        if ((s = calloc(1, sizeof *s)) == NULL)
            return NULL;
        if (pthread_setspecific(scratch_key, s) != 0) {
            free(s);
            return NULL;
        }
    }
    if (s->cap[slot] < need) {
        void *buf = NULL;
        size_t cap = (need / PAGE + 1) * PAGE;
        if (posix_memalign(&buf, PAGE, cap) != 0)
            return NULL;
        free(s->buf[slot]);
        s->buf[slot] = buf;
        s->cap[slot] = cap;
    }
    return s->buf[slot];
}

/* Read the whole file into the thread's scratch buffer, with O_DIRECT where the filesystem allows
 * (a one-off bulk read, a checkpoint load, that would only churn the page cache), else buffered.
 * Returns the buffer (the thread's: not to be freed) and its byte count in *got, or NULL with the
 * job failed. */
static uint8_t *read_whole(job_t *j, size_t *got) {
    int direct = 1;
    int fd = open(j->path, O_RDONLY | O_CLOEXEC | O_DIRECT);
    if (fd < 0 && errno == EINVAL) {
        direct = 0;
        fd = open(j->path, O_RDONLY | O_CLOEXEC);
    }
    if (fd < 0) {
        fail_errno(j, "open");
        return NULL;
    }
    struct stat st;
    void *buf = NULL;
    if (fstat(fd, &st) != 0) {
        fail_errno(j, "fstat");
        close(fd);
        return NULL;
    }
    size_t cap = ((size_t)st.st_size / PAGE + 1) * PAGE; /* a page more: a file grown since is seen short, not cut */
    if ((buf = scratch(FILE_BUF, cap)) == NULL) {
        errno = ENOMEM;
        fail_errno(j, "allocate");
        close(fd);
        return NULL;
    }
    *got = 0;
    while (*got < cap) {
        ssize_t n = pread(fd, (uint8_t *)buf + *got, cap - *got, (off_t)*got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EINVAL && direct) { /* this file refuses O_DIRECT after all: buffered */
            close(fd);
            direct = 0;
            fd = open(j->path, O_RDONLY | O_CLOEXEC);
            *got = 0;
            if (fd < 0)
                break;
            continue;
        }
        if (n < 0) {
            fail_errno(j, "read");
            close(fd);
            return NULL;
        }
        if (n == 0)
            break;
        *got += (size_t)n;
        if (direct && *got % PAGE) /* a short read off a page boundary: the end of the file */
            break;
    }
    if (fd < 0) {
        fail_errno(j, "open");
        return NULL;
    }
    close(fd);
    return buf;
}

/* A job with targets: the whole file read (O_DIRECT), verified, decoded and scattered. */
static void run_scatter(job_t *j, const char *volume) {
    size_t got = 0, len, out_len;
    header_t hd;
    uint8_t *buf = read_whole(j, &got), *raw = NULL;
    if (buf == NULL)
        return;
    if (parse_header(buf, got, &hd, j->msg) || payload_length(&hd, got - HEADER_SIZE, &len, j->msg) ||
        output_length(&hd, j->limit, &out_len, j->msg)) {
        fail_corrupt(j);
        return;
    }
    if (!(hd.flags & FLAG_LZ4))
        raw = buf + HEADER_SIZE;
    else if ((raw = scratch(RAW_BUF, out_len)) == NULL) {
        errno = ENOMEM;
        fail_errno(j, "allocate");
        return;
    }
    if (finish_block(&hd, buf + HEADER_SIZE, len, raw, out_len, block_seed(volume, j->chunk, j->idx), j->msg)) {
        fail_corrupt(j);
        return;
    }
    for (Py_ssize_t t = 0; t < j->ntargets; t++) {
        target_t *tg = &j->targets[t];
        if (tg->lo > tg->hi || tg->hi > out_len || tg->at > tg->dst_len || tg->hi - tg->lo > tg->dst_len - tg->at) {
            snprintf(j->msg, MSG_LEN, "holds %zu bytes, a piece asks for %zu-%zu", out_len, tg->lo, tg->hi);
            fail_corrupt(j);
            return;
        }
        memcpy(tg->dst + tg->at, raw + tg->lo, tg->hi - tg->lo);
    }
}

/* A job without targets: its result, a bytes object of exactly `limit` bytes made beforehand, is
 * what the payload is read (or decoded) straight into; a block of another length fails. */
static void run_job(job_t *j, const char *volume) {
    if (j->ntargets) {
        run_scatter(j, volume);
        return;
    }
    int fd = open(j->path, O_RDONLY | O_CLOEXEC);
    uint8_t head[HEADER_SIZE], *payload = NULL, *raw = NULL;
    header_t hd;
    struct stat st;
    size_t got, len, out_len;
    if (fd < 0) {
        fail_errno(j, "open");
        return;
    }
    if (fstat(fd, &st) != 0) {
        fail_errno(j, "fstat");
        goto done;
    }
    if (read_all(fd, head, HEADER_SIZE, 0, &got) != 0) {
        fail_errno(j, "read");
        goto done;
    }
    size_t size = (size_t)st.st_size > got ? (size_t)st.st_size : got;
    if (parse_header(head, got, &hd, j->msg) || payload_length(&hd, size - HEADER_SIZE, &len, j->msg) ||
        output_length(&hd, j->limit, &out_len, j->msg)) {
        fail_corrupt(j);
        goto done;
    }
    if (out_len != j->limit) { /* its result was made `limit` bytes long, the length metadata books */
        snprintf(j->msg, MSG_LEN, "holds %zu bytes, metadata says %zu", out_len, j->limit);
        fail_corrupt(j);
        goto done;
    }
    raw = (uint8_t *)PyBytes_AS_STRING(j->bytes);
    if (hd.flags & FLAG_LZ4) {
        if ((payload = scratch(FILE_BUF, len)) == NULL) {
            errno = ENOMEM;
            fail_errno(j, "allocate");
            goto done;
        }
    } else {
        payload = raw; /* read straight into the result */
    }
    if (read_all(fd, payload, len, HEADER_SIZE, &got) != 0) {
        fail_errno(j, "read");
        goto done;
    }
    if (got != len) { /* the file shrank since fstat: a block rewritten under us */
        snprintf(j->msg, MSG_LEN, "truncated payload (%zu of %u bytes)", got, hd.stored_len);
        fail_corrupt(j);
        goto done;
    }
    if (finish_block(&hd, payload, len, raw, out_len, block_seed(volume, j->chunk, j->idx), j->msg)) {
        fail_corrupt(j);
        goto done;
    }
done:
    close(fd);
}

static void *worker(void *arg) {
    batch_t *b = arg;
    for (;;) {
        pthread_mutex_lock(&b->lock);
        Py_ssize_t i = b->next++;
        pthread_mutex_unlock(&b->lock);
        if (i >= b->n)
            return NULL;
        run_job(&b->jobs[i], b->volume);
    }
}

static void free_jobs(job_t *jobs, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        for (Py_ssize_t t = 0; t < jobs[i].ntargets; t++)
            PyBuffer_Release(&jobs[i].views[t]);
        free(jobs[i].views);
        free(jobs[i].targets);
        free(jobs[i].path);
        Py_XDECREF(jobs[i].bytes);
    }
    free(jobs);
}

static int take_targets(job_t *j, PyObject *targets) {
    if (targets == Py_None)
        return 0;
    PyObject *seq = PySequence_Fast(targets, "targets must be a list");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    j->targets = calloc((size_t)(n ? n : 1), sizeof(target_t));
    j->views = calloc((size_t)(n ? n : 1), sizeof(Py_buffer));
    if (j->targets == NULL || j->views == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t t = 0; t < n; t++) {
        PyObject *buf;
        Py_ssize_t at, lo, hi;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, t), "Onnn", &buf, &at, &lo, &hi))
            goto bad;
        if (at < 0 || lo < 0 || hi < lo) {
            PyErr_SetString(PyExc_ValueError, "a target's offset, start and end must be ordered and not negative");
            goto bad;
        }
        if (PyObject_GetBuffer(buf, &j->views[t], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0)
            goto bad;
        j->ntargets = t + 1;
        j->targets[t] = (target_t){j->views[t].buf, (size_t)j->views[t].len, (size_t)at, (size_t)lo, (size_t)hi};
    }
    Py_DECREF(seq);
    if (n == 0) { /* no piece wanted: still read and verify the block, return None */
        j->ntargets = 0;
        j->targets[0] = (target_t){0};
    }
    return 0;
bad:
    Py_DECREF(seq);
    return -1;
}

static PyObject *py_read_blocks(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *jobs_in;
    const char *volume;
    int threads;
    if (!PyArg_ParseTuple(args, "Osi", &jobs_in, &volume, &threads))
        return NULL;
    PyObject *seq = PySequence_Fast(jobs_in, "jobs must be a list");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    job_t *jobs = calloc((size_t)(n ? n : 1), sizeof(job_t));
    char *vol = strdup(volume);
    PyObject *out = NULL;
    int *scatter = calloc((size_t)(n ? n : 1), sizeof(int));
    if (jobs == NULL || vol == NULL || scatter == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *path, *targets;
        Py_ssize_t limit;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "O&LLnO", PyUnicode_FSConverter, &path, &jobs[i].chunk,
                              &jobs[i].idx, &limit, &targets))
            goto fail;
        jobs[i].path = strdup(PyBytes_AS_STRING(path));
        Py_DECREF(path);
        jobs[i].limit = limit < 0 ? 0 : (size_t)limit;
        if (jobs[i].path == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        scatter[i] = targets != Py_None;
        if (take_targets(&jobs[i], targets) != 0)
            goto fail;
        /* A result is made here, with the GIL, in this thread's heap where freed blocks are reused;
         * the workers only fill it. */
        if (jobs[i].ntargets == 0 && (jobs[i].bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)jobs[i].limit)) == NULL)
            goto fail;
    }
    if (threads < 1)
        threads = 1;
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads > n)
        threads = (int)n;
    batch_t b = {jobs, n, vol, 0, PTHREAD_MUTEX_INITIALIZER};
    Py_BEGIN_ALLOW_THREADS
    pthread_t tids[MAX_THREADS];
    int started = 0;
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&tids[started], NULL, worker, &b) != 0)
            break; /* fewer threads: the rest of the jobs still run, on those that started */
        started++;
    }
    worker(&b);
    for (int t = 0; t < started; t++)
        pthread_join(tids[t], NULL);
    Py_END_ALLOW_THREADS
    out = PyList_New(n);
    if (out == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item;
        if (jobs[i].failed) {
            item = Py_BuildValue("(is)", jobs[i].err, jobs[i].msg);
        } else if (scatter[i]) {
            item = Py_NewRef(Py_None);
        } else {
            item = jobs[i].bytes;
            jobs[i].bytes = NULL;
        }
        if (item == NULL) {
            Py_CLEAR(out);
            goto fail;
        }
        PyList_SET_ITEM(out, i, item);
    }
fail:
    if (jobs != NULL)
        free_jobs(jobs, n);
    free(scatter);
    free(vol);
    Py_DECREF(seq);
    return out;
}

static PyMethodDef methods[] = {
    {"decode", py_decode, METH_VARARGS, "decode(blob, volume, chunk, idx, limit): the verified raw bytes of one block."},
    {"read_blocks", py_read_blocks, METH_VARARGS,
     "read_blocks(jobs, volume, threads): read, verify and decode many block files in parallel, without the GIL."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "balefs._native", "The native block engine.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (pthread_key_create(&scratch_key, scratch_free) != 0) {
        Py_DECREF(m);
        return PyErr_NoMemory();
    }
    DecodeError = PyErr_NewException("balefs._native.DecodeError", PyExc_ValueError, NULL);
    if (DecodeError == NULL || PyModule_AddObjectRef(m, "DecodeError", DecodeError) != 0 ||
        PyModule_AddIntConstant(m, "HEADER_SIZE", HEADER_SIZE) != 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
