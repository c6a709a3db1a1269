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
 *       errno 0 for a corrupt block. A job with targets reads its whole file into a scratch buffer
 *       and drops its pages from the page cache after (a bulk load's one-off read); one without
 *       reads into its result.
 *       An encrypted volume's job adds keys, [(data key number, the chunk's derived 32-byte key)], and
 *       aads, (the associated data of the block stored plain, of it lz4-compressed): its block must
 *       be sealed (FLAG_AESGCM), whole (not growing) and of exactly `limit` raw bytes; AES-256-GCM
 *       (libipsec-mb) authenticates and decrypts it before any byte is used (the payload's seeded xxh3,
 *       which the tag makes redundant, is read only to word a failure, or first when the block is
 *       decrypted in place). Anything else (a plain block, a key not given, a bad tag) fails the job, and
 *       the Python codec reads the block, reports and repairs.
 *   seal(key, nonce, aad, payload[, out]), open(key, sealed, aad[, out])
 *       AES-256-GCM of one payload with Intel's libipsec-mb (VAES/AVX-512 code where the CPU has it: a
 *       4 MiB payload sealed or opened at 16-18 GB/s per thread here, against 4 GB/s for the system's
 *       OpenSSL 3.0 and 10 GB/s for the OpenSSL the `cryptography` wheel bundles), into a new bytes or
 *       a caller's buffer, the GIL released for all but small payloads: crypto.Keyring seals and
 *       opens through them when the engine is built
 *       (nonces stay drawn in Python, by the Keyring).
 *   cut(blocks, which, starts, lengths, threads[, into]) -> list[bytes] | None   many files out of blocks in memory
 *                                                        (into: a writable buffer they fill one after another)
 *       blocks: objects with the buffer protocol (cached blocks); which, starts, lengths: int64
 *       buffers of one entry per file (its block's index in blocks, where it starts, how long it is).
 *       Every bytes object is made first, with the GIL; the copies then run without it, on the
 *       caller's thread and up to `threads` - 1 helpers kept between calls, which take files as they
 *       come free (the caller never waits for a helper that has not started). A piece outside its
 *       block is a ValueError, before anything is copied.
 *   Digest(bits, seed=0), copy_digest(dst, at, src, digests)      the write side's hashing
 *       A running xxh3 (64 bits seeded: a block's checksum; 128: a file's content hash), and a copy
 *       into a block buffer that feeds the digests each piece while it is still in cache: the chunk
 *       writer's one pass over a large write's bytes, without the GIL.
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
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <limits.h>
#include <intel-ipsec-mb.h>

#include "blockcodec.h"

#define NONCE_BYTES 12
#define TAG_BYTES 16
#define KEY_BYTES 32

/* Intel's multi-buffer crypto library (libipsec-mb): its manager, set up once at import, holds the
 * AES-256-GCM code for this CPU (VAES and AVX-512 where present: 4x the system OpenSSL 3.0's rate
 * here). The direct GCM calls keep no state in it, so every thread shares it. */
static IMB_MGR *gcm_mgr;

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
    int sealed;       /* an encrypted volume's job: keys and aads below */
    Py_ssize_t nkeys;
    uint16_t *key_nos;
    uint8_t (*keys)[KEY_BYTES];
    uint8_t *aad[2]; /* [0]: of the block stored plain, [1]: lz4-compressed */
    size_t aad_len[2];
    PyObject *bytes;  /* the result when there are no targets */
    int err;          /* errno of a failed read; 0 with msg set for a corrupt block */
    int failed;
    char msg[MSG_LEN];
} job_t;

/* n items, each done by `each(ctx, i)`, on up to `threads` threads (the caller's among them):
 * called without the GIL. Fewer threads when some cannot start; the items still all run. */
typedef struct {
    void (*each)(void *ctx, Py_ssize_t i);
    void *ctx;
    Py_ssize_t n, next;
    pthread_mutex_t lock;
} parallel_t;

static void *parallel_worker(void *arg) {
    parallel_t *p = arg;
    for (;;) {
        pthread_mutex_lock(&p->lock);
        Py_ssize_t i = p->next++;
        pthread_mutex_unlock(&p->lock);
        if (i >= p->n)
            return NULL;
        p->each(p->ctx, i);
    }
}

static void run_parallel(Py_ssize_t n, int threads, void (*each)(void *, Py_ssize_t), void *ctx) {
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads > n)
        threads = (int)n;
    parallel_t p = {each, ctx, n, 0, PTHREAD_MUTEX_INITIALIZER};
    pthread_t tids[MAX_THREADS];
    int started = 0;
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&tids[started], NULL, parallel_worker, &p) != 0)
            break;
        started++;
    }
    parallel_worker(&p);
    for (int t = 0; t < started; t++)
        pthread_join(tids[t], NULL);
}

typedef struct {
    job_t *jobs;
    const char *volume;
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

/* Read the whole file into the thread's scratch buffer (a one-off bulk read, a checkpoint load):
 * buffered, its first page and then the rest, and its pages dropped from the page cache after, so
 * the load does not churn the page cache. On this project's VMs (virtio disks) a 512 MiB
 * checkpoint loaded so at 1.5-1.9 GB/s against 0.85-1.5 GB/s with one O_DIRECT read per block
 * file, which this path used before, in alternating loads; the drop cost nothing measurable.
 * Returns the buffer (the thread's: not to be freed) and its byte count in *got, or NULL with the
 * job failed. */
static uint8_t *read_whole(job_t *j, size_t *got) {
    int fd = open(j->path, O_RDONLY | O_CLOEXEC);
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
    /* the header's page alone, then the rest: measured faster than one read of the whole file */
    size_t rest = 0;
    if (read_all(fd, buf, PAGE, 0, got) != 0 ||
        (*got == PAGE && read_all(fd, (uint8_t *)buf + PAGE, cap - PAGE, PAGE, &rest) != 0)) {
        fail_errno(j, "read");
        close(fd);
        return NULL;
    }
    *got += rest;
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
    return buf;
}

/* The checks a sealed job's header must pass (the engine reads only sealed, whole blocks of the
 * booked length); 0, or -1 with the job failed. */
static int sealed_header(job_t *j, const header_t *hd) {
    if (!(hd->flags & FLAG_AESGCM))
        snprintf(j->msg, MSG_LEN, "not encrypted, on an encrypted volume (a block put there from elsewhere)");
    else if (hd->flags & ~(FLAG_AESGCM | FLAG_LZ4) || hd->version != VERSION)
        snprintf(j->msg, MSG_LEN, "a growing or unusual sealed block: the Python codec's to open");
    else if (hd->raw_len != j->limit)
        snprintf(j->msg, MSG_LEN, "holds %u bytes, metadata says %zu", hd->raw_len, j->limit);
    else if (hd->stored_len < NONCE_BYTES + TAG_BYTES || hd->stored_len - NONCE_BYTES - TAG_BYTES > INT_MAX ||
             (!(hd->flags & FLAG_LZ4) && hd->raw_len != hd->stored_len - NONCE_BYTES - TAG_BYTES))
        snprintf(j->msg, MSG_LEN, "sealed length %u does not fit raw length %u", hd->stored_len, hd->raw_len);
    else
        return 0;
    fail_corrupt(j);
    return -1;
}

/* Whether two tags are equal, in time that does not depend on where they differ. */
static int tags_equal(const uint8_t *a, const uint8_t *b) {
    uint8_t diff = 0;
    for (int i = 0; i < TAG_BYTES; i++)
        diff |= a[i] ^ b[i];
    return diff == 0;
}

/* AES-256-GCM of len bytes of in into out (in == out allowed; encrypt: tag written to tag; decrypt:
 * tag checked); 1 when done (always, encrypting; decrypting: authentic), 0 otherwise (out then holds
 * nothing to use). The
 * expanded key and the GHASH state are wiped before returning. */
static int aead(int encrypt, const uint8_t *key, const uint8_t *nonce, const uint8_t *aad, size_t aad_len,
                const uint8_t *in, size_t len, uint8_t *out, uint8_t *tag) {
    struct gcm_key_data kd __attribute__((aligned(64)));
    struct gcm_context_data ctx;
    uint8_t got[TAG_BYTES];
    IMB_AES256_GCM_PRE(gcm_mgr, key, &kd);
    if (encrypt)
        IMB_AES256_GCM_ENC(gcm_mgr, &kd, &ctx, out, in, len, nonce, aad, aad_len, tag, TAG_BYTES);
    else
        IMB_AES256_GCM_DEC(gcm_mgr, &kd, &ctx, out, in, len, nonce, aad, aad_len, got, TAG_BYTES);
    int ok = encrypt || tags_equal(got, tag);
    explicit_bzero(&kd, sizeof kd);
    explicit_bzero(&ctx, sizeof ctx);
    return ok;
}

/* Whether a sealed payload's seeded xxh3 differs from its header's: 1 (the job failed, saying so) or 0. */
static int sealed_digest_differs(job_t *j, const header_t *hd, const uint8_t *payload, size_t len, uint64_t seed) {
    if (bulk_xxh3_seeded(payload, len, seed) == hd->digest)
        return 0;
    snprintf(j->msg, MSG_LEN, "checksum mismatch (damaged bytes, or a block of another chunk, index or volume)");
    fail_corrupt(j);
    return 1;
}

/* Authenticate and decrypt a sealed payload (nonce, ciphertext, tag: len bytes) into out (len - NONCE -
 * TAG bytes; payload + NONCE for in place); 0, or -1 with the job failed (out then holds nothing to use).
 * The tag covers every byte and the block's identity, so the payload's xxh3 (a pass as long as the
 * AES's) is read only to word a failure as the Python codec does, or first where decrypting in place
 * would overwrite the ciphertext it covers. */
static int open_sealed(job_t *j, const header_t *hd, const uint8_t *payload, size_t len, uint8_t *out, uint64_t seed) {
    size_t clen = len - NONCE_BYTES - TAG_BYTES;
    int in_place = out == payload + NONCE_BYTES;
    if (in_place && sealed_digest_differs(j, hd, payload, len, seed))
        return -1;
    const uint8_t *key = NULL;
    for (Py_ssize_t k = 0; k < j->nkeys; k++)
        if (j->key_nos[k] == hd->key_no)
            key = j->keys[k];
    if (key == NULL) {
        if (!in_place && sealed_digest_differs(j, hd, payload, len, seed))
            return -1;
        snprintf(j->msg, MSG_LEN, "sealed under data key %u, not given to the engine", hd->key_no);
        fail_corrupt(j);
        return -1;
    }
    int which = (hd->flags & FLAG_LZ4) ? 1 : 0;
    int ok = aead(0, key, payload, j->aad[which], (size_t)j->aad_len[which], payload + NONCE_BYTES, clen, out,
                  (uint8_t *)(payload + NONCE_BYTES + clen));
    if (!ok) {
        if (!in_place && sealed_digest_differs(j, hd, payload, len, seed))
            return -1;
        snprintf(j->msg, MSG_LEN, "authentication failed (damaged ciphertext, or a block of another chunk, index or volume)");
        fail_corrupt(j);
        return -1;
    }
    return 0;
}

/* Where a job's one target takes the whole block (a bulk load's tensor): a sealed, uncompressed block
 * is decrypted straight there, with no copy through the scratch buffer; else NULL. */
static uint8_t *whole_target(const job_t *j) {
    if (j->ntargets != 1)
        return NULL;
    const target_t *tg = &j->targets[0];
    if (tg->lo != 0 || tg->hi != j->limit || tg->at > tg->dst_len || tg->hi > tg->dst_len - tg->at)
        return NULL;
    return tg->dst + tg->at;
}

/* A sealed job with targets: the whole file read (read_whole), authenticated and decrypted (into `into`,
 * the job's whole target, when the block is not compressed, else in place), lz4-decoded when
 * flagged; returns the raw bytes (`into`, or the thread's scratch, to scatter) or NULL. */
static uint8_t *open_scatter(job_t *j, const char *volume, uint8_t *buf, size_t got, uint8_t *into) {
    header_t hd;
    size_t len;
    if (parse_any_header(buf, got, &hd, j->msg) || payload_length(&hd, got - HEADER_SIZE, &len, j->msg)) {
        fail_corrupt(j);
        return NULL;
    }
    if (sealed_header(j, &hd))
        return NULL;
    uint8_t *payload = buf + HEADER_SIZE, *plain = payload + NONCE_BYTES;
    if (into != NULL && !(hd.flags & FLAG_LZ4))
        plain = into; /* sealed_header checked that it holds exactly the raw length */
    uint8_t *raw = plain;
    if (open_sealed(j, &hd, payload, len, plain, block_seed(volume, j->chunk, j->idx)))
        return NULL;
    if (hd.flags & FLAG_LZ4) {
        if ((raw = scratch(RAW_BUF, hd.raw_len)) == NULL) {
            errno = ENOMEM;
            fail_errno(j, "allocate");
            return NULL;
        }
        if (lz4_block(&hd, plain, len - NONCE_BYTES - TAG_BYTES, raw, hd.raw_len, j->msg)) {
            fail_corrupt(j);
            return NULL;
        }
    }
    return raw;
}

/* A job with targets: the whole file read (read_whole), verified, decoded and scattered. */
static void run_scatter(job_t *j, const char *volume) {
    size_t got = 0, len = 0, out_len = 0;
    header_t hd;
    uint8_t *buf = read_whole(j, &got), *raw = NULL;
    if (buf == NULL)
        return;
    if (j->sealed) {
        uint8_t *into = whole_target(j);
        if ((raw = open_scatter(j, volume, buf, got, into)) == NULL)
            return;
        if (raw == into)
            return; /* decrypted in its place: nothing to scatter */
        out_len = j->limit; /* sealed_header checked the raw length is exactly that */
    } else if (parse_header(buf, got, &hd, j->msg) || payload_length(&hd, got - HEADER_SIZE, &len, j->msg) ||
        output_length(&hd, j->limit, &out_len, j->msg)) {
        fail_corrupt(j);
        return;
    } else if (!(hd.flags & FLAG_LZ4))
        raw = buf + HEADER_SIZE;
    else if ((raw = scratch(RAW_BUF, out_len)) == NULL) {
        errno = ENOMEM;
        fail_errno(j, "allocate");
        return;
    }
    if (!j->sealed &&
        finish_block(&hd, buf + HEADER_SIZE, len, raw, out_len, block_seed(volume, j->chunk, j->idx), j->msg)) {
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

/* A sealed job without targets: the payload read into scratch, authenticated and decrypted into
 * the result (or in place, then lz4-decoded into the result). */
static void run_sealed(job_t *j, const char *volume, int fd, const uint8_t *head, size_t got, size_t size) {
    header_t hd;
    size_t len;
    uint8_t *payload, *raw = (uint8_t *)PyBytes_AS_STRING(j->bytes);
    if (parse_any_header(head, got, &hd, j->msg) || payload_length(&hd, size - HEADER_SIZE, &len, j->msg)) {
        fail_corrupt(j);
        return;
    }
    if (sealed_header(j, &hd))
        return;
    if ((payload = scratch(FILE_BUF, len)) == NULL) {
        errno = ENOMEM;
        fail_errno(j, "allocate");
        return;
    }
    if (read_all(fd, payload, len, HEADER_SIZE, &got) != 0) {
        fail_errno(j, "read");
        return;
    }
    if (got != len) { /* the file shrank since fstat: a block rewritten under us */
        snprintf(j->msg, MSG_LEN, "truncated payload (%zu of %u bytes)", got, hd.stored_len);
        fail_corrupt(j);
        return;
    }
    int lz4 = hd.flags & FLAG_LZ4;
    uint8_t *plain = lz4 ? payload + NONCE_BYTES : raw;
    if (open_sealed(j, &hd, payload, len, plain, block_seed(volume, j->chunk, j->idx)))
        return;
    if (lz4 && lz4_block(&hd, plain, len - NONCE_BYTES - TAG_BYTES, raw, j->limit, j->msg))
        fail_corrupt(j);
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
    if (j->sealed) {
        run_sealed(j, volume, fd, head, got, size);
        goto done;
    }
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

static void job_at(void *ctx, Py_ssize_t i) {
    batch_t *b = ctx;
    run_job(&b->jobs[i], b->volume);
}

static void free_jobs(job_t *jobs, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        for (Py_ssize_t t = 0; t < jobs[i].ntargets; t++)
            PyBuffer_Release(&jobs[i].views[t]);
        free(jobs[i].views);
        free(jobs[i].targets);
        free(jobs[i].path);
        free(jobs[i].key_nos);
        if (jobs[i].keys != NULL)
            memset(jobs[i].keys, 0, (size_t)jobs[i].nkeys * KEY_BYTES); /* no key left behind in freed memory */
        free(jobs[i].keys);
        free(jobs[i].aad[0]);
        free(jobs[i].aad[1]);
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

/* A sealed job's keys [(number, 32-byte key)] and aads (plain, lz4), copied into the job; 0 or -1. */
static int take_keys(job_t *j, PyObject *keys, PyObject *aads) {
    if (keys == Py_None)
        return 0;
    j->sealed = 1;
    PyObject *seq = PySequence_Fast(keys, "keys must be a list");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    j->key_nos = calloc((size_t)(n ? n : 1), sizeof(uint16_t));
    j->keys = calloc((size_t)(n ? n : 1), KEY_BYTES);
    if (j->key_nos == NULL || j->keys == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        int number;
        const char *key;
        Py_ssize_t key_len;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, k), "iy#", &number, &key, &key_len)) {
            Py_DECREF(seq);
            return -1;
        }
        if (key_len != KEY_BYTES || number < 0 || number > 0xffff) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "a key must be (number 0-65535, 32 bytes)");
            return -1;
        }
        j->key_nos[k] = (uint16_t)number;
        memcpy(j->keys[k], key, KEY_BYTES);
        j->nkeys = k + 1;
    }
    Py_DECREF(seq);
    const char *aad[2];
    Py_ssize_t aad_len[2];
    if (!PyArg_ParseTuple(aads, "y#y#", &aad[0], &aad_len[0], &aad[1], &aad_len[1]))
        return -1;
    for (int a = 0; a < 2; a++) {
        if (aad_len[a] > INT_MAX || (j->aad[a] = malloc((size_t)aad_len[a] + 1)) == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(j->aad[a], aad[a], (size_t)aad_len[a]);
        j->aad_len[a] = (size_t)aad_len[a];
    }
    return 0;
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
        PyObject *path, *targets, *keys = Py_None, *aads = Py_None;
        Py_ssize_t limit;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "O&LLnO|OO", PyUnicode_FSConverter, &path,
                              &jobs[i].chunk, &jobs[i].idx, &limit, &targets, &keys, &aads))
            goto fail;
        jobs[i].path = strdup(PyBytes_AS_STRING(path));
        Py_DECREF(path);
        jobs[i].limit = limit < 0 ? 0 : (size_t)limit;
        if (jobs[i].path == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        if (take_keys(&jobs[i], keys, aads) != 0)
            goto fail;
        scatter[i] = targets != Py_None;
        if (take_targets(&jobs[i], targets) != 0)
            goto fail;
        /* A result is made here, with the GIL, in this thread's heap where freed blocks are reused;
         * the workers only fill it. */
        if (jobs[i].ntargets == 0 && (jobs[i].bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)jobs[i].limit)) == NULL)
            goto fail;
    }
    batch_t b = {jobs, vol};
    Py_BEGIN_ALLOW_THREADS
    run_parallel(n, threads, job_at, &b);
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

/* -- seal(key, nonce, aad, payload[, out]) and open(key, sealed, aad[, out]) --------------------- */

/* Larger payloads are sealed and opened with the GIL released; a small one is quicker done holding it. */
#define AEAD_UNLOCKED 16384


/* Whether [a, a + an) and [b, b + bn) share a byte (AES-GCM works in place only on the very same bytes). */
static int overlap(const void *a, size_t an, const void *b, size_t bn) {
    const uint8_t *x = a, *y = b;
    return an && bn && x < y + bn && y < x + an;
}

/* aead() called from Python: with the GIL released when the payload is large enough to be worth it. */
static int aead_py(int encrypt, const uint8_t *key, const uint8_t *nonce, const uint8_t *aad, size_t aad_len,
                   const uint8_t *in, size_t len, uint8_t *out, uint8_t *tag) {
    if (len < AEAD_UNLOCKED)
        return aead(encrypt, key, nonce, aad, aad_len, in, len, out, tag);
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = aead(encrypt, key, nonce, aad, aad_len, in, len, out, tag);
    Py_END_ALLOW_THREADS
    return ok;
}

/* Where seal/open write `need` bytes: the caller's `out_obj` (taken into *out, *have_out set; it must
 * be writable, at least `need` bytes, exactly `need` when `exact`, and not overlap [in, in + in_len)),
 * else a new bytes object put in *result. NULL with an exception set (`what` names the rule broken). */
static uint8_t *destination(PyObject *out_obj, Py_buffer *out, int *have_out, PyObject **result, size_t need,
                            int exact, const void *in, size_t in_len, const char *what) {
    if (out_obj == Py_None) {
        if ((*result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)need)) == NULL)
            return NULL;
        return (uint8_t *)PyBytes_AS_STRING(*result);
    }
    if (PyObject_GetBuffer(out_obj, out, PyBUF_WRITABLE) != 0)
        return NULL;
    *have_out = 1;
    if ((size_t)out->len < need || (exact && (size_t)out->len != need) || overlap(out->buf, need, in, in_len)) {
        PyErr_SetString(PyExc_ValueError, what);
        return NULL;
    }
    return out->buf;
}


/* seal(key, nonce, aad, payload[, out]): nonce + ciphertext + tag of payload (crypto.Keyring.seal's
 * layout, the nonce given by the caller, who draws it); with out (a writable buffer of at least
 * len(payload) + 28 bytes, not overlapping payload) written there and its length returned, else a
 * new bytes object. */
static PyObject *py_seal(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer key, nonce, aad, in, out = {0};
    PyObject *out_obj = Py_None, *result = NULL;
    if (!PyArg_ParseTuple(args, "y*y*y*y*|O", &key, &nonce, &aad, &in, &out_obj))
        return NULL;
    int have_out = 0;
    size_t need = (size_t)in.len + NONCE_BYTES + TAG_BYTES;
    uint8_t *dst = NULL;
    if (key.len != KEY_BYTES || nonce.len != NONCE_BYTES || in.len > INT_MAX - 64 || aad.len > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "seal: a 32-byte key, a 12-byte nonce and under 2 GiB of payload");
        goto done;
    }
    if ((dst = destination(out_obj, &out, &have_out, &result, need, 0, in.buf, (size_t)in.len,
                           "seal: out must hold len(payload) + 28 bytes and not overlap payload")) == NULL)
        goto done;
    memcpy(dst, nonce.buf, NONCE_BYTES);
    (void)aead_py(1, key.buf, nonce.buf, aad.buf, (size_t)aad.len, in.buf, (size_t)in.len, dst + NONCE_BYTES,
                  dst + NONCE_BYTES + in.len); /* (sealing cannot fail) */
    if (have_out)
        result = PyLong_FromSize_t(need);
done:
    if (have_out)
        PyBuffer_Release(&out);
    PyBuffer_Release(&in);
    PyBuffer_Release(&aad);
    PyBuffer_Release(&nonce);
    PyBuffer_Release(&key);
    return result;
}

/* open(key, sealed, aad[, out]): the payload that seal() sealed (nonce + ciphertext + tag), as new
 * bytes, or with out (writable, exactly len(sealed) - 28 bytes, not overlapping sealed) written
 * there and True returned; None (no out) or False when the tag does not authenticate (out then
 * holds nothing to use). */
static PyObject *py_open(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer key, sealed, aad, out = {0};
    PyObject *out_obj = Py_None, *result = NULL;
    if (!PyArg_ParseTuple(args, "y*y*y*|O", &key, &sealed, &aad, &out_obj))
        return NULL;
    int have_out = 0;
    uint8_t *dst = NULL;
    if (key.len != KEY_BYTES || sealed.len > INT_MAX - 64 || aad.len > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "open: a 32-byte key and under 2 GiB sealed");
        goto done;
    }
    if (sealed.len < NONCE_BYTES + TAG_BYTES) { /* too short to be sealed: it does not authenticate */
        result = Py_NewRef(out_obj == Py_None ? Py_None : Py_False);
        goto done;
    }
    size_t len = (size_t)sealed.len - NONCE_BYTES - TAG_BYTES;
    if ((dst = destination(out_obj, &out, &have_out, &result, len, 1, sealed.buf, (size_t)sealed.len,
                           "open: out must be exactly len(sealed) - 28 bytes and not overlap sealed")) == NULL)
        goto done;
    const uint8_t *s = sealed.buf;
    int ok = aead_py(0, key.buf, s, aad.buf, (size_t)aad.len, s + NONCE_BYTES, len, dst, (uint8_t *)(s + NONCE_BYTES + len));
    if (have_out)
        result = Py_NewRef(ok ? Py_True : Py_False);
    else if (!ok) {
        Py_CLEAR(result);
        result = Py_NewRef(Py_None);
    }
done:
    if (have_out)
        PyBuffer_Release(&out);
    PyBuffer_Release(&aad);
    PyBuffer_Release(&sealed);
    PyBuffer_Release(&key);
    return result;
}

/* -- cut(blocks, which, starts, lengths, threads) ------------------------------------------------ */

/* One call's copies. Files are claimed CLAIM at a time from `next`, by the caller and by any crew
 * helper that joins while there is work left; `active` counts the helpers inside (under the
 * crew's lock), which are the only ones the caller ever waits for. */
#define CLAIM 8

typedef struct {
    char **dst;
    const char **src;
    const int64_t *lengths;
    Py_ssize_t n;
    Py_ssize_t next;
    int active;
} cut_batch_t;

/* Helper threads kept between calls. A helper that is not running when a batch opens never
 * delays it: the caller copies whatever nobody claimed, closes the batch and then waits only
 * for helpers already inside it, each at most one claim from its end. */
static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake, left;
    cut_batch_t *batch; /* the open batch, or NULL */
    int busy;           /* a call holds the crew, from opening its batch until every helper left it */
    unsigned long generation;
    int helpers;
} crew = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, 0, 0, 0};

static void cut_claims(cut_batch_t *b) {
    for (;;) {
        Py_ssize_t from = __atomic_fetch_add(&b->next, CLAIM, __ATOMIC_RELAXED);
        if (from >= b->n)
            return;
        Py_ssize_t to = from + CLAIM < b->n ? from + CLAIM : b->n;
        for (Py_ssize_t i = from; i < to; i++)
            memcpy(b->dst[i], b->src[i], (size_t)b->lengths[i]);
    }
}

static void *crew_helper(void *arg) {
    (void)arg;
    unsigned long seen = 0;
    pthread_mutex_lock(&crew.lock);
    for (;;) {
        while (crew.batch == NULL || crew.generation == seen)
            pthread_cond_wait(&crew.wake, &crew.lock);
        cut_batch_t *b = crew.batch;
        seen = crew.generation;
        b->active++;
        pthread_mutex_unlock(&crew.lock);
        cut_claims(b);
        pthread_mutex_lock(&crew.lock);
        if (--b->active == 0)
            pthread_cond_broadcast(&crew.left);
    }
    return NULL;
}

/* A forked child has none of the parent's threads (a loader's workers fork): start afresh. */
static void crew_before_fork(void) { pthread_mutex_lock(&crew.lock); }
static void crew_after_fork_parent(void) { pthread_mutex_unlock(&crew.lock); }
static void crew_after_fork_child(void) {
    pthread_mutex_init(&crew.lock, NULL);
    pthread_cond_init(&crew.wake, NULL);
    pthread_cond_init(&crew.left, NULL);
    crew.batch = NULL;
    crew.busy = 0;
    crew.helpers = 0;
}

/* Copy every file of `b`, with up to `helpers` crew threads joining; called without the GIL. */
static void cut_copy(cut_batch_t *b, int helpers) {
    pthread_mutex_lock(&crew.lock);
    if (helpers < 1 || crew.busy) { /* one thread asked, or another call holds the crew */
        pthread_mutex_unlock(&crew.lock);
        cut_claims(b);
        return;
    }
    while (crew.helpers < helpers) {
        pthread_t tid;
        pthread_attr_t attr;
        int made = pthread_attr_init(&attr) == 0;
        if (made) {
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
            made = pthread_create(&tid, &attr, crew_helper, NULL) == 0;
            pthread_attr_destroy(&attr);
        }
        if (!made)
            break; /* fewer helpers: the caller copies the rest */
        crew.helpers++;
    }
    crew.batch = b;
    crew.busy = 1;
    crew.generation++;
    pthread_cond_broadcast(&crew.wake);
    pthread_mutex_unlock(&crew.lock);
    cut_claims(b);
    pthread_mutex_lock(&crew.lock);
    crew.batch = NULL;
    while (b->active > 0)
        pthread_cond_wait(&crew.left, &crew.lock);
    crew.busy = 0;
    pthread_mutex_unlock(&crew.lock);
}

/* An int64 column of n entries, as a read-only buffer (a numpy array, an array.array('q')...). */
static int int64_column(PyObject *obj, Py_buffer *view, Py_ssize_t n, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS) != 0)
        return -1;
    if (view->itemsize != 8 || view->len != n * 8) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "cut: %s must hold one int64 per file", what);
        return -1;
    }
    return 0;
}

static PyObject *py_cut(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *blocks_in, *which_in, *starts_in, *lengths_in, *into = Py_None;
    int threads;
    if (!PyArg_ParseTuple(args, "OOOOi|O", &blocks_in, &which_in, &starts_in, &lengths_in, &threads, &into))
        return NULL;
    PyObject *seq = PySequence_Fast(blocks_in, "blocks must be a list");
    if (seq == NULL)
        return NULL;
    Py_ssize_t nb = PySequence_Fast_GET_SIZE(seq);
    Py_ssize_t n = PyObject_Length(which_in);
    PyObject *out = NULL;
    Py_buffer *bufs = calloc((size_t)(nb ? nb : 1), sizeof(Py_buffer));
    Py_ssize_t held = 0;
    Py_buffer which = {0}, starts = {0}, lengths = {0}, dest = {0};
    int columns = 0, packed = 0;
    char **dst = NULL;
    const char **src = NULL;
    if (n < 0 || bufs == NULL) {
        if (bufs == NULL)
            PyErr_NoMemory();
        goto done;
    }
    for (; held < nb; held++)
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, held), &bufs[held], PyBUF_C_CONTIGUOUS) != 0)
            goto done;
    if (int64_column(which_in, &which, n, "which") != 0)
        goto done;
    columns = 1;
    if (int64_column(starts_in, &starts, n, "starts") != 0)
        goto done;
    columns = 2;
    if (int64_column(lengths_in, &lengths, n, "lengths") != 0)
        goto done;
    columns = 3;
    const int64_t *w = which.buf, *s = starts.buf, *len = lengths.buf;
    dst = malloc((size_t)(n ? n : 1) * sizeof(char *));
    src = malloc((size_t)(n ? n : 1) * sizeof(char *));
    if (dst == NULL || src == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (w[i] < 0 || w[i] >= nb || s[i] < 0 || len[i] < 0 || len[i] > bufs[w[i]].len ||
            s[i] > bufs[w[i]].len - len[i]) {
            PyErr_Format(PyExc_ValueError, "cut: file %zd lies outside its block", i);
            goto done;
        }
        src[i] = (const char *)bufs[w[i]].buf + s[i];
        total += len[i];
    }
    if (into != Py_None) { /* every file, one after another, into the caller's buffer */
        if (PyObject_GetBuffer(into, &dest, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0)
            goto done;
        packed = 1;
        if (dest.len != total) {
            PyErr_Format(PyExc_ValueError, "cut: into holds %zd bytes, the files %lld", dest.len, (long long)total);
            goto done;
        }
        for (Py_ssize_t i = 0, at = 0; i < n; at += (Py_ssize_t)len[i], i++)
            dst[i] = (char *)dest.buf + at;
        out = Py_NewRef(Py_None);
    } else {
        if ((out = PyList_New(n)) == NULL)
            goto done;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)len[i]);
            if (b == NULL) {
                Py_CLEAR(out);
                goto done;
            }
            dst[i] = PyBytes_AS_STRING(b);
            PyList_SET_ITEM(out, i, b);
        }
    }
    /* Below 1 MiB a helper costs more than the copy it would take on. */
    int64_t per_thread = 1 << 20;
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads > total / per_thread)
        threads = (int)(total / per_thread);
    cut_batch_t batch = {dst, src, len, n, 0, 0};
    Py_BEGIN_ALLOW_THREADS
    cut_copy(&batch, threads - 1);
    Py_END_ALLOW_THREADS
done:
    free(dst);
    free(src);
    if (packed)
        PyBuffer_Release(&dest);
    if (columns > 2)
        PyBuffer_Release(&lengths);
    if (columns > 1)
        PyBuffer_Release(&starts);
    if (columns > 0)
        PyBuffer_Release(&which);
    for (Py_ssize_t k = 0; k < held; k++)
        PyBuffer_Release(&bufs[k]);
    free(bufs);
    Py_DECREF(seq);
    return out;
}

/* -- running digests ---------------------------------------------------------------------------- */

/* balefs._native.Digest(bits, seed=0): a running xxh3, 64 bits seeded or 128, as xxhash's objects
 * (update, intdigest, hexdigest: the same values), that copy_digest can feed in the same pass as a
 * copy. `busy` (set with the GIL held) refuses a second thread feeding it while one runs without
 * the GIL: two updates at once would scramble the state. */
typedef struct {
    PyObject_HEAD XXH3_state_t *st;
    int bits, busy;
} DigestObject;

static PyTypeObject DigestType;

static int digest_init(DigestObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"bits", "seed", NULL};
    int bits;
    unsigned long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "i|K", names, &bits, &seed))
        return -1;
    if (bits != 64 && bits != 128) {
        PyErr_SetString(PyExc_ValueError, "Digest: bits must be 64 or 128");
        return -1;
    }
    if (bits == 128 && seed != 0) {
        PyErr_SetString(PyExc_ValueError, "Digest: a 128-bit digest takes no seed");
        return -1;
    }
    if (self->st == NULL && (self->st = XXH3_createState()) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Digest: reset while another thread feeds it");
        return -1;
    }
    self->bits = bits;
    if (bits == 64)
        XXH3_64bits_reset_withSeed(self->st, seed);
    else
        XXH3_128bits_reset(self->st);
    return 0;
}

static void digest_dealloc(DigestObject *self) {
    XXH3_freeState(self->st);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static void digest_feed(DigestObject *d, const void *p, size_t n) {
    if (d->bits == 64)
        bulk_xxh3_64_update(d->st, p, n);
    else
        bulk_xxh3_128_update(d->st, p, n);
}

/* Take a digest for feeding without the GIL: 0, or -1 with an exception set. */
static int digest_take(PyObject *o) {
    if (!PyObject_TypeCheck(o, &DigestType)) {
        PyErr_SetString(PyExc_TypeError, "expected balefs._native.Digest objects");
        return -1;
    }
    DigestObject *d = (DigestObject *)o;
    if (d->st == NULL || d->busy) {
        PyErr_SetString(PyExc_RuntimeError, d->st == NULL ? "Digest: not initialised" : "Digest: fed by two threads at once");
        return -1;
    }
    d->busy = 1;
    return 0;
}

/* Inputs below this are hashed with the GIL held: letting it go costs more. */
#define DIGEST_NOGIL ((Py_ssize_t)256 << 10)

static PyObject *digest_update(DigestObject *self, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_C_CONTIGUOUS) != 0)
        return NULL;
    if (digest_take((PyObject *)self) != 0) {
        PyBuffer_Release(&b);
        return NULL;
    }
    if (b.len >= DIGEST_NOGIL) {
        Py_BEGIN_ALLOW_THREADS
        digest_feed(self, b.buf, (size_t)b.len);
        Py_END_ALLOW_THREADS
    } else {
        digest_feed(self, b.buf, (size_t)b.len);
    }
    self->busy = 0;
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

static PyObject *digest_intdigest(DigestObject *self, PyObject *unused) {
    (void)unused;
    if (self->st == NULL || self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Digest: not initialised, or being fed");
        return NULL;
    }
    if (self->bits == 64)
        return PyLong_FromUnsignedLongLong(XXH3_64bits_digest(self->st));
    XXH128_hash_t h = XXH3_128bits_digest(self->st);
    PyObject *hi = PyLong_FromUnsignedLongLong(h.high64), *lo = PyLong_FromUnsignedLongLong(h.low64), *out = NULL;
    PyObject *shift = PyLong_FromLong(64), *up = NULL;
    if (hi != NULL && lo != NULL && shift != NULL && (up = PyNumber_Lshift(hi, shift)) != NULL)
        out = PyNumber_Or(up, lo);
    Py_XDECREF(hi);
    Py_XDECREF(lo);
    Py_XDECREF(shift);
    Py_XDECREF(up);
    return out;
}

static PyObject *digest_hexdigest(DigestObject *self, PyObject *unused) {
    (void)unused;
    if (self->st == NULL || self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Digest: not initialised, or being fed");
        return NULL;
    }
    unsigned char raw[16];
    size_t n;
    if (self->bits == 64) {
        XXH64_canonical_t c;
        XXH64_canonicalFromHash(&c, XXH3_64bits_digest(self->st));
        memcpy(raw, c.digest, n = sizeof c.digest);
    } else {
        XXH128_canonical_t c;
        XXH128_canonicalFromHash(&c, XXH3_128bits_digest(self->st));
        memcpy(raw, c.digest, n = sizeof c.digest);
    }
    char hex[33];
    for (size_t i = 0; i < n; i++)
        snprintf(hex + 2 * i, 3, "%02x", raw[i]);
    return PyUnicode_FromStringAndSize(hex, (Py_ssize_t)(2 * n));
}

static PyMethodDef digest_methods[] = {
    {"update", (PyCFunction)digest_update, METH_O, "update(data): feed bytes (the GIL let go for large ones)."},
    {"intdigest", (PyCFunction)digest_intdigest, METH_NOARGS, "intdigest(): the digest so far, as an int."},
    {"hexdigest", (PyCFunction)digest_hexdigest, METH_NOARGS, "hexdigest(): the digest so far, in hex (big-endian)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DigestType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "balefs._native.Digest",
    .tp_basicsize = sizeof(DigestObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Digest(bits, seed=0): a running xxh3 (64 bits seeded, or 128), as xxhash.xxh3_64/xxh3_128.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)digest_init,
    .tp_dealloc = (destructor)digest_dealloc,
    .tp_methods = digest_methods,
};

/* copy_digest(dst, at, src, digests): src copied into dst[at:at + len(src)] and fed to every digest,
 * one piece at a time while the piece is still in the CPU's cache (one pass over the bytes where a
 * copy and then each hash would read them from memory once each), the GIL let go for large ones. */
#define COPY_PIECE ((size_t)64 << 10)

static PyObject *py_copy_digest(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *dst_in, *src_in, *digests_in;
    Py_ssize_t at;
    if (!PyArg_ParseTuple(args, "OnOO", &dst_in, &at, &src_in, &digests_in))
        return NULL;
    PyObject *seq = PySequence_Fast(digests_in, "copy_digest: digests must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t nd = PySequence_Fast_GET_SIZE(seq), taken = 0;
    Py_buffer dst = {0}, src = {0};
    int have_dst = 0, have_src = 0;
    PyObject *out = NULL;
    DigestObject *ds[4];
    if (nd > 4) {
        PyErr_SetString(PyExc_ValueError, "copy_digest: at most 4 digests");
        goto done;
    }
    if (PyObject_GetBuffer(dst_in, &dst, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0)
        goto done;
    have_dst = 1;
    if (PyObject_GetBuffer(src_in, &src, PyBUF_C_CONTIGUOUS) != 0)
        goto done;
    have_src = 1;
    if (at < 0 || at > dst.len || src.len > dst.len - at) {
        PyErr_Format(PyExc_ValueError, "copy_digest: %zd bytes at %zd do not fit a buffer of %zd", src.len, at, dst.len);
        goto done;
    }
    for (; taken < nd; taken++) {
        PyObject *o = PySequence_Fast_GET_ITEM(seq, taken);
        if (digest_take(o) != 0)
            goto done;
        ds[taken] = (DigestObject *)o;
    }
    char *to = (char *)dst.buf + at;
    const char *from = src.buf;
    size_t len = (size_t)src.len;
    Py_BEGIN_ALLOW_THREADS
    for (size_t pos = 0; pos < len; pos += COPY_PIECE) {
        size_t n = len - pos < COPY_PIECE ? len - pos : COPY_PIECE;
        memmove(to + pos, from + pos, n);
        for (Py_ssize_t k = 0; k < nd; k++)
            digest_feed(ds[k], to + pos, n);
    }
    Py_END_ALLOW_THREADS
    out = Py_NewRef(Py_None);
done:
    for (Py_ssize_t k = 0; k < taken; k++)
        ds[k]->busy = 0;
    if (have_src)
        PyBuffer_Release(&src);
    if (have_dst)
        PyBuffer_Release(&dst);
    Py_DECREF(seq);
    return out;
}

/* -- check_mapped(blobs, volume, keys, threads) -------------------------------------------------- */

/* One mapped block file: its bytes, and what its record says (chunk, index, raw length). */
typedef struct {
    Py_buffer view;
    long long chunk, idx;
    size_t length;
    int bad;
    char msg[MSG_LEN];
} mapped_t;

typedef struct {
    mapped_t *m;
    const char *volume;
} mapped_batch_t;

/* Populate one mapping's pages and check it as a plain block of its record, in place; no GIL. */
static void check_one(mapped_t *m, const char *volume) {
    const uint8_t *data = m->view.buf;
    size_t have = (size_t)m->view.len, len = 0;
    uintptr_t lo = (uintptr_t)data & ~(uintptr_t)(PAGE - 1);
    if (have > 0) /* (advice: one call instead of a fault per page; an older kernel's EINVAL is harmless) */
        madvise((void *)lo, have + ((uintptr_t)data - lo), MADV_POPULATE_READ);
    header_t hd;
    size_t raw_len = 0;
    if (parse_header(data, have, &hd, m->msg) || payload_length(&hd, have - HEADER_SIZE, &len, m->msg)) {
        m->bad = 1;
    } else if (hd.flags & FLAG_LZ4) {
        snprintf(m->msg, MSG_LEN, "compressed: not a plain block");
        m->bad = 1;
    } else if (output_length(&hd, len, &raw_len, m->msg)) {
        m->bad = 1;
    } else if (raw_len != m->length) {
        snprintf(m->msg, MSG_LEN, "holds %zu bytes, metadata says %zu", raw_len, m->length);
        m->bad = 1;
    } else {
        m->bad = verify_raw(&hd, data + HEADER_SIZE, len, block_seed(volume, m->chunk, m->idx), m->msg) != 0;
    }
}

static void mapped_at(void *ctx, Py_ssize_t i) {
    mapped_batch_t *b = ctx;
    check_one(&b->m[i], b->volume);
}

/* check_mapped(blobs, volume, keys, threads): each blob (a read-only mapping of a block file) has
 * its pages populated and is checked in place as a plain block of key (chunk, idx, raw length):
 * header, lengths and the seeded xxh3 of its payload, on up to `threads` threads without the GIL.
 * Per blob None, or the message of what is wrong with it. */
static PyObject *py_check_mapped(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *blobs_in, *keys_in, *out = NULL;
    const char *volume;
    int threads;
    if (!PyArg_ParseTuple(args, "OsOi", &blobs_in, &volume, &keys_in, &threads))
        return NULL;
    PyObject *blobs = PySequence_Fast(blobs_in, "check_mapped: blobs must be a sequence");
    PyObject *keys = blobs ? PySequence_Fast(keys_in, "check_mapped: keys must be a sequence") : NULL;
    if (keys == NULL) {
        Py_XDECREF(blobs);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(blobs), held = 0;
    mapped_t *m = NULL;
    if (PySequence_Fast_GET_SIZE(keys) != n) {
        PyErr_SetString(PyExc_ValueError, "check_mapped: one key per blob");
        goto done;
    }
    if ((m = calloc(n > 0 ? (size_t)n : 1, sizeof *m)) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; held < n; held++) {
        mapped_t *x = &m[held];
        Py_ssize_t length;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(keys, held), "LLn;check_mapped: a key is (chunk, idx, length)",
                              &x->chunk, &x->idx, &length))
            goto done;
        if (length < 0) {
            PyErr_SetString(PyExc_ValueError, "check_mapped: a negative length");
            goto done;
        }
        x->length = (size_t)length;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(blobs, held), &x->view, PyBUF_SIMPLE) != 0)
            goto done;
    }
    mapped_batch_t b = {m, volume};
    Py_BEGIN_ALLOW_THREADS
    run_parallel(n, threads, mapped_at, &b);
    Py_END_ALLOW_THREADS
    if ((out = PyList_New(n)) == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = m[i].bad ? PyUnicode_FromString(m[i].msg) : Py_NewRef(Py_None);
        if (item == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, item);
    }
done:
    for (Py_ssize_t i = 0; i < held; i++)
        PyBuffer_Release(&m[i].view);
    free(m);
    Py_DECREF(keys);
    Py_DECREF(blobs);
    return out;
}

static PyMethodDef methods[] = {
    {"decode", py_decode, METH_VARARGS, "decode(blob, volume, chunk, idx, limit): the verified raw bytes of one block."},
    {"check_mapped", py_check_mapped, METH_VARARGS,
     "check_mapped(blobs, volume, keys, threads): per mapped block file None, or what is wrong with it as a plain block of key (chunk, idx, length); checked in place without the GIL."},
    {"read_blocks", py_read_blocks, METH_VARARGS,
     "read_blocks(jobs, volume, threads): read, verify and decode many block files in parallel, without the GIL."},
    {"seal", py_seal, METH_VARARGS,
     "seal(key, nonce, aad, payload[, out]): nonce + AES-256-GCM ciphertext + tag, as bytes or written into out (its length)."},
    {"open", py_open, METH_VARARGS,
     "open(key, sealed, aad[, out]): the payload seal() sealed, as bytes or written into out (True); None/False if it does not authenticate."},
    {"cut", py_cut, METH_VARARGS,
     "cut(blocks, which, starts, lengths, threads[, into]): the bytes of many files cut out of blocks in memory, copied without the GIL (into: a writable buffer of their total size that they fill one after another; returns None)."},
    {"copy_digest", py_copy_digest, METH_VARARGS,
     "copy_digest(dst, at, src, digests): src copied into dst at `at` and fed to each Digest, in one pass without the GIL."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "balefs._native", "The native block engine.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if ((gcm_mgr = alloc_mb_mgr(0)) == NULL) {
        Py_DECREF(m);
        return PyErr_NoMemory();
    }
    init_mb_mgr_auto(gcm_mgr, NULL);
    if (imb_get_errno(gcm_mgr) != 0) {
        Py_DECREF(m);
        PyErr_Format(PyExc_ImportError, "libipsec-mb could not set up AES-256-GCM: %s", imb_get_strerror(imb_get_errno(gcm_mgr)));
        return NULL;
    }
    if (pthread_key_create(&scratch_key, scratch_free) != 0 ||
        pthread_atfork(crew_before_fork, crew_after_fork_parent, crew_after_fork_child) != 0) {
        Py_DECREF(m);
        return PyErr_NoMemory();
    }
    DecodeError = PyErr_NewException("balefs._native.DecodeError", PyExc_ValueError, NULL);
    if (DecodeError == NULL || PyModule_AddObjectRef(m, "DecodeError", DecodeError) != 0 ||
        PyModule_AddIntConstant(m, "HEADER_SIZE", HEADER_SIZE) != 0 || PyType_Ready(&DigestType) != 0 ||
        PyModule_AddObjectRef(m, "Digest", (PyObject *)&DigestType) != 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
