/* balefs._fusenative: a libfuse 3 low-level session whose read path stays in C.
 *
 * `balefs mount --session native` serves the kernel from here. The session holds an
 * inode table in native memory (ino -> attributes, a directory's sorted entries, a file's pieces:
 * which byte range of which block file holds each part of it) that Python fills in batches, one
 * call per directory (balefs/fuse/native_session.py, the "provider"). LOOKUP, GETATTR, READDIR,
 * READDIRPLUS, OPEN, READ, RELEASE are then answered from the table and from a bounded native
 * block cache, blocks read, checked and lz4-decoded with the block engine's code (blockcodec.h),
 * without the GIL. Python is entered only to fill the table, to read the metadata's generation
 * counter at each OPEN (close-to-open: a file whose entry is older than the counter is fetched
 * again; and the volume's grants checked, if it has any; on an SQLite volume with neither grants
 * nor audited reads the counter is read here instead, through libsqlite3, without the GIL), to move
 * an access time that relatime says an open moves (the rule is applied here: at most once a day per
 * file, so most opens of a read-write mount stay here), for a read the native path cannot serve
 * (a block on a remote node, a corrupt or missing copy: the Python reader then tries the other
 * copies, repairs and logs, or answers EIO), and for the rare calls (STATFS, READLINK, xattrs).
 * A node leaves the table when the kernel forgets it, or, past MAX_NODES, when the kernel holds
 * no reference to it (it is read again when asked for).
 *
 * On a read-write mount every change, and every call on a file opened for writing, is forwarded to
 * the Python operations through the provider (see "files with Python handles" and "forwarded
 * operations" below); the GIL is taken only for those.
 *
 * A read-only mount with --cached-opens (and nothing to check at an open) puts the kernel in FUSE's
 * no-open mode: the first OPEN is answered ENOSYS, after which the kernel opens, flushes and closes
 * files alone and READs come by inode (node_file), so a warm file costs this session nothing; a change
 * made elsewhere is then seen when the kernel reads the file's attributes again, not at its open.
 *
 * A listing past the metadata TTL whose generation counter has not moved (read natively) still
 * answers LOOKUPs of its files (their attributes change only with the counter, access times aside).
 *
 * Cold reads: the first open of a small file's version hands its bytes to the kernel's page cache
 * (notify_store), so the file costs LOOKUP, OPEN and RELEASE, no READ; a burst of LOOKUPs in a
 * directory not listed yet makes one listing (the others wait for it); a reader going through a chunk's blocks in order (its previous block is cached) has the
 * next RA_BLOCKS blocks read ahead by a thread of its own, from the block files the pieces named.
 *
 * Provider methods return their result, or a negative errno (never raise).
 *
 * Large writes in order are gathered here and handed to Python 8 MiB at a time, each WRITE answered
 * once copied (see "gathered writes").
 *
 * Entry point: serve(provider, mountpoint, args, volume, entry_timeout, attr_timeout,
 *                    negative_timeout, meta_ttl, cache_bytes, block_limit, threads, max_file_size) -> int
 */
#define FUSE_USE_VERSION 312
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <fuse_lowlevel.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "blockcodec.h"

/* -- operation metrics ----------------------------------------------------------------------------
 * With metrics on (op_stats_enable, before serve), each request type's handling time is counted
 * into a latency histogram (the Python session's bounds, given by Python) and its error answers
 * (ENOENT and ENODATA aside: normal outcomes of a lookup) into a counter; op_stats() reads them for
 * the metrics exporter (balefs_fuse_op_seconds, balefs_fuse_op_errors, as on the Python session). */

#define OP_MAX_BOUNDS 32
enum op_kind {
    K_LOOKUP, K_GETATTR, K_OPEN, K_READ, K_RELEASE, K_OPENDIR, K_READDIR, K_READDIRPLUS, K_RELEASEDIR,
    K_READLINK, K_GETXATTR, K_LISTXATTR, K_STATFS, K_MKNOD, K_MKDIR, K_SYMLINK, K_LINK, K_UNLINK, K_RMDIR,
    K_RENAME, K_SETATTR, K_CREATE, K_WRITE, K_FLUSH, K_FSYNC, K_FSYNCDIR, K_SETXATTR, K_REMOVEXATTR, K_OPS
};
static const char *const op_names[K_OPS] = {
    "lookup", "getattr", "open", "read", "release", "opendir", "readdir", "readdirplus", "releasedir",
    "readlink", "getxattr", "listxattr", "statfs", "mknod", "mkdir", "symlink", "link", "unlink", "rmdir",
    "rename", "setattr", "create", "write", "flush", "fsync", "fsyncdir", "setxattr", "removexattr"};

typedef struct {
    uint64_t buckets[OP_MAX_BOUNDS + 1]; /* the last: above every bound */
    uint64_t sum_ns, errors;
} opstat_t;

static opstat_t opstats[K_OPS];
static double op_bounds[OP_MAX_BOUNDS];
static int op_nbounds;
static int op_counting; /* set once before serving */
static __thread int t_err; /* the errno the handler running on this thread answered last (0: none) */

/* fuse_reply_err, noting the errno for the operation's metrics (the macro below routes every call here). */
static int reply_err_counted(fuse_req_t req, int err) {
    t_err = err;
    return fuse_reply_err(req, err);
}
#define fuse_reply_err reply_err_counted

static void count_op(enum op_kind kind, double seconds, int err) {
    int i = 0;
    while (i < op_nbounds && op_bounds[i] < seconds) /* bisect_left, as Python's Histogram */
        i++;
    opstat_t *o = &opstats[kind];
    __atomic_add_fetch(&o->buckets[i], 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&o->sum_ns, (uint64_t)(seconds > 0 ? seconds * 1e9 : 0), __ATOMIC_RELAXED);
    if (err != 0 && err != ENOENT && err != ENODATA)
        __atomic_add_fetch(&o->errors, 1, __ATOMIC_RELAXED);
}

/* timed_<op>: the handler op_<op>, counted when metrics are on. */
#define TIMED(kind, name, params, args)                      \
    static void timed_##name params {                        \
        if (!op_counting) {                                  \
            op_##name args;                                  \
            return;                                          \
        }                                                    \
        t_err = 0;                                           \
        double t0 = now_s();                                 \
        op_##name args;                                      \
        count_op(kind, now_s() - t0, t_err);                 \
    }

#define NAME_MAX_BYTES 255
#define MAX_READ (1u << 20) /* the kernel's largest READ; the max_read mount option must say the same */
#define HIDDEN_PREFIX ".fuse_hidden"

/* -- the inode table ----------------------------------------------------------------------------- */

typedef struct {
    uint64_t file_off, len, block_lo; /* file bytes [file_off, file_off+len) are block bytes [block_lo, ...) */
    long long chunk, idx;
    const char *path; /* the block file (inside the pieces_t allocation) */
} piece_t;

typedef struct {
    int refs; /* the node and every open file holding it */
    int hashed; /* a file held whole in one plain, durable block: `hash` is its xxh3-128 (canonical) */
    uint8_t hash[16];
    size_t n;
    piece_t p[]; /* then the path strings */
} pieces_t;

typedef struct {
    char *name;
    uint64_t ino;
    mode_t mode; /* its type, for a listing whose node has left the table */
} dent_t;

/* Where a file's reader is, for readahead: READs of one file come on several threads (atomics). */
typedef struct {
    uint64_t next_off; /* where the last READ ended */
    size_t ra_upto;    /* pieces before this one are queued for readahead already */
} ra_state_t;

typedef struct node {
    uint64_t ino;
    uint64_t nlookup;   /* the kernel's references (entries replied, minus FORGETs) */
    struct stat st;
    long long gen;      /* the generation counter when these attributes were read */
    double at;          /* when (monotonic seconds) */
    int has_pieces;     /* a file whose pieces were fetched (pieces NULL: the Python path reads it) */
    pieces_t *pieces;
    uint64_t stamp;     /* this version of the content */
    uint64_t opened;    /* the version the last open saw; 0: none */
    uint64_t given;     /* the version whose attributes the kernel was last given (entry, attr reply); 0: none */
    dent_t *kids;       /* a directory's entries, sorted by name (strcmp) */
    size_t nkids;
    int opens;          /* files open on it, native and Python handles */
    int py;             /* Python handles among them: its reads, size and times may be unflushed ones */
    int hidden;         /* unlinked while open: kept under a hidden name until its last close */
    int listed;
    ra_state_t ra;      /* with no OPEN (no_open): the readahead state of the node's readers */
    const pieces_t *ra_pieces; /* the version it is of (compared, never dereferenced) */
    long long listed_gen;
    double listed_at;
    struct node *next;
} node_t;

#define NBUCKETS (1u << 16)
/* Seconds the kernel keeps the attributes of a file with a Python handle open (unflushed size and times). */
#define PY_ATTR_TIMEOUT 1.0
/* Nodes the table holds before it drops those the kernel holds no reference to (they are read
 * again when asked for): a bound on its memory, a few hundred bytes per node. */
#define MAX_NODES (1u << 20)

/* -- the block cache ------------------------------------------------------------------------------ */

typedef struct block {
    long long chunk, idx;
    uint8_t *data;
    uint8_t *base;   /* the allocation data lies in (freed with the block) */
    int pooled;      /* base is a POOL_CAP buffer of the pool: it goes back there */
    size_t len;
    size_t served;   /* bytes of it a large file's in-order reader was given (atomic): all of them, it goes */
    int refs;        /* the cache's (while in it) and each reader's */
    int loading;     /* being read by one thread: the others wait for it (cache lock, `loaded`) */
    int failed;      /* its read failed: the waiters go the Python way too */
    int in_lru;
    int ahead;       /* read ahead of any reader, not used since */
    struct block *next, *lru_prev, *lru_next;
} block_t;

#define CBUCKETS (1u << 14)

/* Readahead: where each block lives (learnt from the pieces the table was given), and the blocks
 * a reader going through a chunk in order will want next, read by a thread of their own. */
typedef struct bfile {
    long long chunk, idx;
    struct bfile *next;
    char path[];
} bfile_t;

#define FBUCKETS (1u << 14)
#define MAX_BFILES (1u << 20) /* block files remembered; past it the list starts again */
#define RA_BLOCKS 2           /* blocks read ahead of a reader going through a chunk in order */
#define RA_FILE_BLOCKS 8      /* blocks read ahead of a reader going through a large file in order */
#define RA_THREADS 4          /* readahead threads: that many block reads in flight (the disk's queue) */
#define RA_QUEUE 64
#define RA_LIST_BLOCKS 16     /* blocks of a directory's small files read ahead when it is listed */
/* A file this small (in this many pieces) has its bytes handed to the kernel's page cache at its open:
 * its reads then need no READ request */
#define STORE_MAX ((uint64_t)256 << 10)
#define STORE_PIECES 8
#define PAGE_BYTES ((size_t)4096)
/* SQLite's WAL-index header (the -shm file's first bytes, stored twice, the copies equal when no
 * commit is half-written): its change counter, frame count, salts and checksums move at every commit. */
#define WAL_HEADER 48
#define POOL_MAX 16 /* spare block buffers kept, their pages made: a large file read makes none */
#define LISTING_SLOTS 64
#define BUFFER_PREFAULT ((size_t)256 << 10) /* block buffers this large have their pages made at once */
#define GATHER_BYTES ((size_t)8 << 20) /* each of a gathering handle's two buffers */
#define GATHER_AFTER ((uint64_t)1 << 20) /* bytes a handle writes in order before its WRITEs are gathered */
#define GATHER_MAX 8                    /* handles gathering at once (2 x GATHER_BYTES each) */

/* A Python handle's WRITEs gathered in order here (see "gathered writes"). */
typedef struct gather {
    uint64_t ino, pyfh;
    pthread_mutex_t lock;
    pthread_cond_t idle; /* a handover ended */
    char *buf[2];        /* NULL: not made yet, or given up (a view of it outlived a handover) */
    int cur;             /* the buffer being filled */
    size_t fill;
    uint64_t start;      /* the file offset of buf[cur]'s first byte */
    int busy;            /* the other buffer is being handed to Python */
    int err;             /* a handover failed: the handle has failed (in Python too) */
    int stopped;         /* Python answered a call on the handle with an error: its WRITEs go there again */
    int refs;            /* the handle's, and each settle in progress (gathers_lock) */
    struct gather *next;
} gather_t;

typedef struct {
    PyObject *provider;
    struct fuse_session *se;
    char *volume;
    double entry_timeout, attr_timeout, negative_timeout, meta_ttl;
    size_t block_limit;
    pthread_mutex_t lock; /* the inode table and seen_gen */
    node_t *buckets[NBUCKETS];
    long long seen_gen; /* the newest generation any call has read */
    size_t nnodes;
    pthread_mutex_t cache_lock;
    pthread_cond_t loaded; /* a block being read is in (or failed) */
    block_t *cbuckets[CBUCKETS];
    block_t *lru_head, *lru_tail; /* head: most recently used */
    size_t cache_bytes, cache_cap;
    int pyhandles; /* Python handles open (atomic): while 0, no read needs to ask about unflushed data */
    char *gen_path, *gen_sql; /* the SQLite file holding the generation counter, and its query; NULL: ask Python */
    int gen_broken;           /* the file could not be read here: every open asks Python */
    pthread_key_t gen_key;    /* each thread's connection to it (gen_conn_t) */
    pthread_mutex_t memo_lock; /* the counter as last read, and the WAL-index header before that read */
    int shm_fd;                /* the file's -shm (WAL index), opened once; -1: none, every open queries */
    int shm_tried;
    int memo_valid;
    uint8_t memo_header[WAL_HEADER];
    long long memo_gen;
    pthread_mutex_t policy_lock;
    double policy_at;  /* when the provider last said whether opens need it */
    int opens_checked; /* they do: grants to check, or reads drawn for the audit trail */
    int relatime;      /* opens for reading move access times (a read-write mount without noatime) */
    int no_open;       /* a read-only mount whose opens check nothing: OPEN answered ENOSYS, so the kernel
                        * sends no OPEN, FLUSH or RELEASE again and READs come by inode (fh 0) */
    int policy_busy;   /* a thread is asking */
    int policy_late;   /* no_open, and opens came to need checking after the mount started (atomic) */
    uint64_t listing[LISTING_SLOTS]; /* directories a LOOKUP is listing now (0: a free slot; lock) */
    pthread_cond_t listed;           /* one of them is done */
    pthread_mutex_t store_lock; /* one store into the kernel's page cache at a time (store_at_open) */
    pthread_mutex_t ra_lock; /* the block files and the readahead queue (a leaf lock) */
    pthread_cond_t ra_wake;
    bfile_t *fbuckets[FBUCKETS];
    size_t nbfiles;
    struct {
        long long chunk, idx;
        int large; /* a large file's block (read ahead in file order, not chunk order) */
    } ra_queue[RA_QUEUE];
    size_t ra_head, ra_len;
    int ra_stop;
    pthread_mutex_t pool_lock; /* the spare buffers (a leaf lock) */
    void *pool[POOL_MAX];
    size_t pool_n, pool_cap;   /* pool_cap: their size, a block file of the volume's largest (0: no pool) */
    pthread_mutex_t gathers_lock; /* the list of gathering handles and their refs (a leaf lock) */
    gather_t *gathers;
    int ngathers;       /* (atomic) while 0, nothing is gathered: no call needs to settle */
    uint64_t max_file;  /* a volume's largest file: a WRITE that would pass it goes to Python (EFBIG at once) */
} session_t;

static session_t *S; /* one session per process */

static void settle_ino(uint64_t ino);

typedef struct {
    uint64_t ino;
    uint64_t size;
    pieces_t *pieces; /* NULL: read through Python */
    uint64_t pyfh;    /* a Python handle (writes, or a file with unflushed data): every call forwarded; 0: native */
    ra_state_t own;
    ra_state_t *ra;    /* &own; with no OPEN, the node's (its readers share it: it lives while the kernel
                        * holds the inode, which it does while a READ of it is in flight) */
    uint64_t wnext, wrun; /* a Python handle: where its last WRITE ended, and the bytes written in order to there */
    gather_t *gather;     /* its WRITEs are gathered (atomic; set once, cleared at RELEASE) */
} openfile_t;

typedef struct {
    size_t n;
    dent_t *ents; /* a copy of the directory's entries when it was opened */
} opendir_t;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void pieces_unref(pieces_t *p) {
    if (p != NULL && __atomic_sub_fetch(&p->refs, 1, __ATOMIC_ACQ_REL) == 0)
        free(p);
}

static pieces_t *pieces_ref(pieces_t *p) {
    if (p != NULL)
        __atomic_add_fetch(&p->refs, 1, __ATOMIC_ACQ_REL);
    return p;
}

static void free_kids(dent_t *kids, size_t n) {
    for (size_t i = 0; i < n; i++)
        free(kids[i].name);
    free(kids);
}

/* The node of `ino`, or NULL (lock held). */
static node_t *find(uint64_t ino) {
    for (node_t *n = S->buckets[ino % NBUCKETS]; n; n = n->next)
        if (n->ino == ino)
            return n;
    return NULL;
}

/* The node of `ino`, made if new; NULL when out of memory (lock held). */
static node_t *find_or_add(uint64_t ino) {
    node_t *n = find(ino);
    if (n != NULL)
        return n;
    if ((n = calloc(1, sizeof *n)) == NULL)
        return NULL;
    n->ino = ino;
    n->gen = -1;
    n->next = S->buckets[ino % NBUCKETS];
    S->buckets[ino % NBUCKETS] = n;
    S->nnodes++;
    return n;
}

static void free_node(node_t *n) {
    pieces_unref(n->pieces);
    free_kids(n->kids, n->nkids);
    free(n);
}

/* Drop the node of `ino` if the kernel holds no reference to it (lock held); never the root. */
static void drop_if_unused(uint64_t ino) {
    node_t **pp = &S->buckets[ino % NBUCKETS];
    while (*pp && (*pp)->ino != ino)
        pp = &(*pp)->next;
    node_t *n = *pp;
    if (n == NULL || n->nlookup > 0 || n->opens > 0 || ino == FUSE_ROOT_ID)
        return;
    *pp = n->next;
    S->nnodes--;
    free_node(n);
}

/* Past MAX_NODES, drop every node the kernel holds no reference to (lock held). */
static void trim(void) {
    if (S->nnodes <= MAX_NODES)
        return;
    for (size_t b = 0; b < NBUCKETS; b++) {
        node_t **pp = &S->buckets[b];
        while (*pp) {
            node_t *n = *pp;
            if (n->nlookup == 0 && n->opens == 0 && n->ino != FUSE_ROOT_ID) {
                *pp = n->next;
                S->nnodes--;
                free_node(n);
            } else {
                pp = &n->next;
            }
        }
    }
}

/* The kernel took a reference to `ino` (an entry replied, with its attributes; lock held). */
static void referenced(uint64_t ino) {
    node_t *n = find(ino);
    if (n != NULL) {
        n->nlookup++;
        n->given = n->stamp;
    }
}

/* -- calls into Python ------------------------------------------------------------------------------ */

static __thread int pinned;

/* Take the GIL on a libfuse worker thread. The first call keeps a thread state for the thread's
 * whole life (the metadata store keeps a per-thread connection in a threading.local, which a
 * state made and dropped per call would lose). */
static PyGILState_STATE gil(void) {
    if (!pinned) {
        PyGILState_Ensure();
        PyEval_SaveThread();
        pinned = 1;
    }
    return PyGILState_Ensure();
}

/* provider.<method>(*args) with the GIL held; NULL after logging a Python error (EIO). */
static PyObject *call(const char *method, const char *fmt, ...) {
    va_list va;
    va_start(va, fmt);
    PyObject *args = Py_VaBuildValue(fmt, va);
    va_end(va);
    if (args == NULL) {
        PyErr_WriteUnraisable(NULL);
        return NULL;
    }
    PyObject *fn = PyObject_GetAttrString(S->provider, method);
    PyObject *out = fn ? PyObject_Call(fn, args, NULL) : NULL;
    Py_XDECREF(fn);
    Py_DECREF(args);
    if (out == NULL)
        PyErr_WriteUnraisable(S->provider);
    return out;
}

/* The errno a provider result stands for: a negative int, or a call that failed (EIO); else 0. */
static int err_of(PyObject *r) {
    if (r == NULL)
        return EIO;
    if (PyLong_Check(r)) {
        long v = PyLong_AsLong(r);
        return v < 0 ? (int)-v : EIO;
    }
    return 0;
}

/* attrs: (ino, mode, nlink, uid, gid, size, blocks, blksize, atime_ns, mtime_ns, ctime_ns) */
static int parse_attrs(PyObject *t, struct stat *st) {
    unsigned long long ino, mode, nlink, uid, gid, size, blocks, blksize;
    long long at, mt, ct;
    if (!PyTuple_Check(t)) {
        PyErr_Format(PyExc_TypeError, "attributes are a tuple of 11 integers, not %.100s", Py_TYPE(t)->tp_name);
        return -1;
    }
    if (!PyArg_ParseTuple(t, "KKKKKKKKLLL", &ino, &mode, &nlink, &uid, &gid, &size, &blocks, &blksize, &at, &mt, &ct))
        return -1;
    memset(st, 0, sizeof *st);
    st->st_ino = ino;
    st->st_mode = (mode_t)mode;
    st->st_nlink = (nlink_t)nlink;
    st->st_uid = (uid_t)uid;
    st->st_gid = (gid_t)gid;
    st->st_size = (off_t)size;
    st->st_blocks = (blkcnt_t)blocks;
    st->st_blksize = (blksize_t)blksize;
    st->st_atim.tv_sec = at / 1000000000;
    st->st_atim.tv_nsec = at % 1000000000;
    st->st_mtim.tv_sec = mt / 1000000000;
    st->st_mtim.tv_nsec = mt % 1000000000;
    st->st_ctim.tv_sec = ct / 1000000000;
    st->st_ctim.tv_nsec = ct % 1000000000;
    return 0;
}

/* pieces: None, or [(file_off, len, path bytes, chunk, idx, block_lo)] in file order; a file's one
 * piece may carry a seventh item, the file's 16-byte xxh3-128 content hash (its block stored plain
 * and durable: a READ by inode may read just its bytes). NULL with *bad set on a malformed list; NULL
 * with *bad clear for None. */
static pieces_t *parse_pieces(PyObject *list, int *bad) {
    *bad = 0;
    if (list == Py_None)
        return NULL;
    PyObject *seq = PySequence_Fast(list, "pieces must be a list");
    if (seq == NULL) {
        *bad = 1;
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    size_t strings = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(seq, i), *path;
        Py_ssize_t items = PyTuple_Check(t) ? PyTuple_GET_SIZE(t) : 0;
        if ((items != 6 && (items != 7 || n != 1)) || !PyBytes_Check(path = PyTuple_GET_ITEM(t, 2))) {
            PyErr_SetString(PyExc_TypeError,
                            "a piece is (file_off, len, path bytes, chunk, idx, block_lo[, 16-byte hash of a file's one piece])");
            goto bad;
        }
        strings += (size_t)PyBytes_GET_SIZE(path) + 1;
    }
    pieces_t *p = malloc(sizeof *p + (size_t)n * sizeof(piece_t) + strings);
    if (p == NULL) {
        PyErr_NoMemory();
        goto bad;
    }
    p->refs = 1;
    p->hashed = 0;
    p->n = (size_t)n;
    char *str = (char *)&p->p[n];
    for (Py_ssize_t i = 0; i < n; i++) {
        piece_t *pc = &p->p[i];
        const char *path;
        Py_ssize_t plen;
        unsigned long long off, len, lo;
        const char *hash = NULL;
        Py_ssize_t hlen = 0;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KKy#LLK|y#", &off, &len, &path, &plen, &pc->chunk,
                              &pc->idx, &lo, &hash, &hlen)) {
            free(p);
            goto bad;
        }
        if (hash != NULL) {
            if (hlen != (Py_ssize_t)sizeof p->hash) {
                PyErr_SetString(PyExc_ValueError, "a file's content hash is 16 bytes");
                free(p);
                goto bad;
            }
            memcpy(p->hash, hash, sizeof p->hash);
            p->hashed = 1;
        }
        pc->file_off = off;
        pc->len = len;
        pc->block_lo = lo;
        memcpy(str, path, (size_t)plen);
        str[plen] = 0;
        pc->path = str;
        str += plen + 1;
    }
    Py_DECREF(seq);
    return p;
bad:
    Py_DECREF(seq);
    *bad = 1;
    return NULL;
}

static uint64_t stamp_of(const struct stat *st) {
    uint64_t v[4] = {(uint64_t)st->st_size, (uint64_t)st->st_mtim.tv_sec * 1000000000u + (uint64_t)st->st_mtim.tv_nsec,
                     (uint64_t)st->st_ctim.tv_sec * 1000000000u + (uint64_t)st->st_ctim.tv_nsec, 0};
    return XXH3_64bits(v, sizeof v) | 1; /* never 0: 0 means "not opened" */
}

static void forget_block_files(void) {
    for (size_t i = 0; i < FBUCKETS; i++) {
        while (S->fbuckets[i]) {
            bfile_t *f = S->fbuckets[i];
            S->fbuckets[i] = f->next;
            free(f);
        }
    }
    S->nbfiles = 0;
}

static uint64_t bfile_hash(long long chunk, long long idx) { return (uint64_t)(chunk * 1000003 + idx) % FBUCKETS; }

/* Remember where the blocks of these pieces live, for readahead (a block moved since: its new file). */
static void learn_block_files(const pieces_t *p) {
    pthread_mutex_lock(&S->ra_lock);
    for (size_t i = 0; i < p->n; i++) {
        const piece_t *pc = &p->p[i];
        bfile_t **pp = &S->fbuckets[bfile_hash(pc->chunk, pc->idx)];
        while (*pp && ((*pp)->chunk != pc->chunk || (*pp)->idx != pc->idx))
            pp = &(*pp)->next;
        if (*pp != NULL && strcmp((*pp)->path, pc->path) == 0)
            continue;
        size_t len = strlen(pc->path) + 1;
        bfile_t *f = malloc(sizeof *f + len);
        if (f == NULL)
            break;
        f->chunk = pc->chunk;
        f->idx = pc->idx;
        memcpy(f->path, pc->path, len);
        if (*pp != NULL) { /* replace */
            f->next = (*pp)->next;
            free(*pp);
            *pp = f;
            continue;
        }
        if (S->nbfiles >= MAX_BFILES) {
            forget_block_files();
            pp = &S->fbuckets[bfile_hash(pc->chunk, pc->idx)];
        }
        f->next = *pp;
        *pp = f;
        S->nbfiles++;
    }
    pthread_mutex_unlock(&S->ra_lock);
}

/* A Python error met with the table's lock held, kept (the first one) to be reported once the lock is
 * let go: reporting writes to stderr, which lets go of the GIL, which a thread waiting for the lock
 * may be holding (GIL, then lock: the order every caller takes them in). */
typedef struct {
    PyObject *type, *value, *tb;
} late_err_t;

static void err_keep(late_err_t *e) {
    if (e->type == NULL)
        PyErr_Fetch(&e->type, &e->value, &e->tb);
    else
        PyErr_Clear();
}

static void err_report(late_err_t *e) {
    if (e->type == NULL)
        return;
    PyErr_Restore(e->type, e->value, e->tb);
    PyErr_WriteUnraisable(S->provider);
    e->type = e->value = e->tb = NULL;
}

/* Take (attrs, pieces) read at generation `gen` into the table (lock held); 0 or -1. */
static int install(PyObject *attrs, PyObject *pieces_obj, long long gen, struct stat *out) {
    struct stat st;
    int bad;
    if (parse_attrs(attrs, &st) != 0)
        return -1;
    pieces_t *pieces = parse_pieces(pieces_obj, &bad);
    if (bad)
        return -1;
    node_t *n = find_or_add(st.st_ino);
    if (n == NULL) {
        pieces_unref(pieces);
        PyErr_NoMemory();
        return -1;
    }
    n->st = st;
    n->gen = gen;
    n->at = now_s();
    n->stamp = stamp_of(&st);
    if (S_ISREG(st.st_mode)) {
        if (pieces != NULL)
            learn_block_files(pieces);
        pieces_unref(n->pieces);
        n->pieces = pieces;
        n->has_pieces = 1;
    } else {
        pieces_unref(pieces);
    }
    if (gen > S->seen_gen)
        S->seen_gen = gen;
    if (out)
        *out = st;
    return 0;
}

static int cmp_dent(const void *a, const void *b) { return strcmp(((const dent_t *)a)->name, ((const dent_t *)b)->name); }

static void read_ahead_listed(const long long (*blocks)[2], size_t n);

/* The first RA_LIST_BLOCKS blocks (chunk, index) holding small files of a listing, in its order,
 * each once, added to `blocks` (n of them so far); table lock held. */
static size_t listed_blocks(const node_t *f, long long (*blocks)[2], size_t n) {
    if (f == NULL || f->pieces == NULL || (uint64_t)f->st.st_size > STORE_MAX)
        return n;
    for (size_t i = 0; i < f->pieces->n && n < RA_LIST_BLOCKS; i++) {
        const piece_t *pc = &f->pieces->p[i];
        size_t j = 0;
        while (j < n && (blocks[j][0] != pc->chunk || blocks[j][1] != pc->idx))
            j++;
        if (j == n) {
            blocks[n][0] = pc->chunk;
            blocks[n++][1] = pc->idx;
        }
    }
    return n;
}

/* List directory `ino` through Python into the table: provider.listdir(ino) -> (gen, [(name
 * bytes, attrs, pieces)]). 0, or an errno. GIL not held on entry. */
static int relist(uint64_t ino) {
    PyGILState_STATE g = gil();
    long long blocks[RA_LIST_BLOCKS][2];
    size_t nblocks = 0;
    int err = 0;
    dent_t *kids = NULL;
    PyObject *r = call("listdir", "(K)", (unsigned long long)ino), *seq = NULL;
    long long gen;
    PyObject *list;
    if ((err = err_of(r)) != 0)
        goto out;
    if (!PyArg_ParseTuple(r, "LO", &gen, &list) || (seq = PySequence_Fast(list, "entries")) == NULL) {
        PyErr_WriteUnraisable(S->provider);
        err = EIO;
        goto out;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if ((kids = calloc((size_t)n + 1, sizeof *kids)) == NULL) {
        err = ENOMEM;
        goto out;
    }
    late_err_t bad = {NULL, NULL, NULL};
    pthread_mutex_lock(&S->lock);
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *e = PySequence_Fast_GET_ITEM(seq, i);
        const char *name;
        Py_ssize_t nlen;
        PyObject *attrs, *pieces;
        struct stat st;
        if (!PyArg_ParseTuple(e, "y#OO", &name, &nlen, &attrs, &pieces) || install(attrs, pieces, gen, &st) != 0) {
            err_keep(&bad); /* the entry is left out */
            continue;
        }
        if ((kids[k].name = strndup(name, (size_t)nlen)) == NULL)
            continue;
        kids[k].mode = st.st_mode;
        kids[k++].ino = st.st_ino;
        if (S_ISREG(st.st_mode) && nblocks < RA_LIST_BLOCKS)
            nblocks = listed_blocks(find(st.st_ino), blocks, nblocks);
    }
    qsort(kids, (size_t)k, sizeof *kids, cmp_dent);
    node_t *d = find_or_add(ino);
    if (d != NULL) {
        free_kids(d->kids, d->nkids);
        d->kids = kids;
        d->nkids = (size_t)k;
        d->listed = 1;
        d->listed_gen = gen;
        d->listed_at = now_s();
        kids = NULL;
        d->nlookup++; /* kept through the trim: the caller is about to use it */
        trim();
        d->nlookup--;
    } else {
        err = ENOMEM;
    }
    pthread_mutex_unlock(&S->lock);
    err_report(&bad);
    if (kids != NULL)
        free_kids(kids, (size_t)k);
out:
    Py_XDECREF(seq);
    Py_XDECREF(r);
    PyGILState_Release(g);
    read_ahead_listed((const long long (*)[2])blocks, nblocks);
    return err;
}

/* List directory `ino` for a LOOKUP: when another LOOKUP is listing it already, wait for that
 * listing instead (a burst of lookups in a directory not listed yet makes one call into Python,
 * not one per thread); 0, or an errno. GIL not held on entry. */
static int relist_shared(uint64_t ino) {
    pthread_mutex_lock(&S->lock);
    int joined = 0;
    for (;;) {
        size_t i, free_slot = LISTING_SLOTS;
        for (i = 0; i < LISTING_SLOTS && S->listing[i] != ino; i++)
            if (S->listing[i] == 0 && free_slot == LISTING_SLOTS)
                free_slot = i;
        if (i < LISTING_SLOTS) { /* being listed: wait */
            joined = 1;
            pthread_cond_wait(&S->listed, &S->lock);
            continue;
        }
        if (joined) {
            pthread_mutex_unlock(&S->lock);
            return 0; /* (if that listing failed, the caller's LOOKUP asks Python for the one name) */
        }
        if (free_slot == LISTING_SLOTS) { /* every slot taken: list without sharing */
            pthread_mutex_unlock(&S->lock);
            return relist(ino);
        }
        S->listing[free_slot] = ino;
        pthread_mutex_unlock(&S->lock);
        int err = relist(ino);
        pthread_mutex_lock(&S->lock);
        S->listing[free_slot] = 0;
        pthread_cond_broadcast(&S->listed);
        pthread_mutex_unlock(&S->lock);
        return err;
    }
}

static int took_node(PyObject *r, struct stat *st, int entry, uint64_t parent);

/* Fetch one inode through Python: provider.<method>(args) -> (gen, attrs, pieces); 0 or an errno. */
static int fetch(struct stat *st, const char *method, const char *fmt, unsigned long long a, const char *name) {
    PyGILState_STATE g = gil();
    PyObject *r = name ? call(method, fmt, a, name) : call(method, fmt, a);
    int err = took_node(r, st, 0, 0);
    Py_XDECREF(r);
    PyGILState_Release(g);
    return err;
}

/* -- the generation counter, read without Python ------------------------------------------------- */

/* Seconds between two questions to the provider whether opens need it (grants, audited reads). */
#define POLICY_TTL 1.0

typedef struct {
    sqlite3 *db;
    sqlite3_stmt *query;
} gen_conn_t;

static void gen_conn_free(void *p) {
    gen_conn_t *c = p;
    if (c == NULL)
        return;
    sqlite3_finalize(c->query);
    sqlite3_close(c->db);
    free(c);
}

/* This thread's connection to the metadata file (a connection is for one thread at a time);
 * NULL when it cannot be opened (then no thread tries again: opens ask Python). */
static gen_conn_t *gen_conn(void) {
    gen_conn_t *c = pthread_getspecific(S->gen_key);
    if (c != NULL)
        return c;
    if ((c = calloc(1, sizeof *c)) == NULL)
        return NULL;
    if (sqlite3_open_v2(S->gen_path, &c->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL) != SQLITE_OK ||
        sqlite3_busy_timeout(c->db, 60000) != SQLITE_OK ||
        sqlite3_prepare_v2(c->db, S->gen_sql, -1, &c->query, NULL) != SQLITE_OK ||
        pthread_setspecific(S->gen_key, c) != 0) {
        fprintf(stderr, "balefs native session: %s: %s; opens read the generation counter through Python\n",
                S->gen_path, c->db ? sqlite3_errmsg(c->db) : "out of memory");
        gen_conn_free(c);
        __atomic_store_n(&S->gen_broken, 1, __ATOMIC_RELAXED);
        return NULL;
    }
    return c;
}

/* The metadata file's WAL-index header now into `out`: 0, or -1 when it cannot be read whole and
 * settled (no -shm file: not in WAL mode; a commit writing it; not yet initialised). Read with pread,
 * never mapped: a -shm truncated under the session reads short instead of faulting. The file is
 * opened after this session's first query (its connection has made the WAL index by then). */
static int wal_header(uint8_t out[WAL_HEADER]) {
    pthread_mutex_lock(&S->memo_lock);
    int fd = S->shm_fd;
    pthread_mutex_unlock(&S->memo_lock);
    uint8_t two[2 * WAL_HEADER];
    if (fd < 0 || pread(fd, two, sizeof two, 0) != (ssize_t)sizeof two)
        return -1;
    if (two[12] == 0 || memcmp(two, two + WAL_HEADER, WAL_HEADER) != 0) /* (byte 12: isInit) */
        return -1;
    memcpy(out, two, WAL_HEADER);
    return 0;
}

/* The generation counter as the metadata file holds it now (the query Meta.generation runs, in a
 * read transaction of its own: a commit that ended before this call is seen); -1: ask Python.
 * When the WAL-index header is what it was just before the last query, nothing has committed since
 * that query began, so its answer still holds: a pread instead of a read transaction (locks, page
 * reads, about a tenth of the daemon's CPU per cold file). */
static long long gen_native(void) {
    gen_conn_t *c = gen_conn();
    if (c == NULL)
        return -1;
    uint8_t before[WAL_HEADER];
    int have = wal_header(before) == 0;
    if (have) {
        pthread_mutex_lock(&S->memo_lock);
        int same = S->memo_valid && memcmp(S->memo_header, before, WAL_HEADER) == 0;
        long long memo = S->memo_gen;
        pthread_mutex_unlock(&S->memo_lock);
        if (same)
            return memo;
    }
    long long gen = -1;
    if (sqlite3_step(c->query) == SQLITE_ROW)
        gen = sqlite3_column_int64(c->query, 0);
    sqlite3_reset(c->query); /* ends the read transaction: no snapshot is kept between opens */
    pthread_mutex_lock(&S->memo_lock);
    if (!S->shm_tried && gen >= 0) {
        size_t n = strlen(S->gen_path) + sizeof "-shm";
        char *path = malloc(n);
        if (path != NULL) {
            snprintf(path, n, "%s-shm", S->gen_path);
            S->shm_fd = open(path, O_RDONLY | O_CLOEXEC);
            free(path);
        }
        S->shm_tried = 1;
    }
    if (have && gen >= 0) {
        memcpy(S->memo_header, before, WAL_HEADER);
        S->memo_gen = gen;
        S->memo_valid = 1;
    }
    pthread_mutex_unlock(&S->memo_lock);
    return gen;
}

/* The generation counter now, read without Python where the session can (-1 where it cannot: a
 * volume on PostgreSQL). For revalidating what the table holds; an open's check is opens_checked's. */
static long long counter_now(void) {
    if (S->gen_path == NULL || __atomic_load_n(&S->gen_broken, __ATOMIC_RELAXED))
        return -1;
    return gen_native();
}

/* Whether the volume's policy checks opens (grants, reads drawn for the audit trail): the provider's
 * answer, asked again every POLICY_TTL seconds by one thread (the others keep the last answer; "yes"
 * until the first one comes, and for an error). */
static int policy_checks(void) {
    double now = now_s();
    pthread_mutex_lock(&S->policy_lock);
    int ask = !S->policy_busy && now - S->policy_at >= POLICY_TTL;
    int checked = S->opens_checked;
    S->policy_busy |= ask;
    pthread_mutex_unlock(&S->policy_lock);
    if (!ask)
        return checked;
    PyGILState_STATE g = gil();
    PyObject *r = call("opens_checked", "()");
    checked = r != Py_False; /* an error: yes */
    Py_XDECREF(r);
    PyGILState_Release(g);
    pthread_mutex_lock(&S->policy_lock);
    S->opens_checked = checked;
    S->policy_at = now_s();
    S->policy_busy = 0;
    pthread_mutex_unlock(&S->policy_lock);
    return checked;
}

/* Whether an open must ask the provider: the policy checks opens, or there is no file to read the
 * counter from. */
static int opens_checked(void) {
    if (S->gen_path == NULL || __atomic_load_n(&S->gen_broken, __ATOMIC_RELAXED))
        return 1;
    return policy_checks();
}

/* Whether what the table holds for a node may still answer LOOKUP/GETATTR (lock held): read at the
 * newest generation seen, within the metadata TTL (a stat may be that old, as on the Python path). */
static int fresh(long long gen, double at) { return gen == S->seen_gen && now_s() - at < S->meta_ttl; }

/* -- access times (relatime) ---------------------------------------------------------------------- */

#define DAY_NS (86400LL * 1000000000LL)

static long long ns_of(const struct timespec *ts) { return (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec; }

/* Whether a read now moves the access time of a file with these attributes: relatime's rule, as
 * balefs/storage/atime.py's relatime_due (not newer than its mtime or ctime, or a day old). */
static int atime_due(const struct stat *st) {
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    long long at = ns_of(&st->st_atim);
    return at <= ns_of(&st->st_mtim) || at <= ns_of(&st->st_ctim) || ns_of(&now) - at >= DAY_NS;
}

/* -- blocks ------------------------------------------------------------------------------------- */

/* A POOL_CAP-sized, page-aligned buffer whose pages are made: a spare one, else a new one. */
static uint8_t *pool_take(void) {
    void *p = NULL;
    pthread_mutex_lock(&S->pool_lock);
    if (S->pool_n > 0)
        p = S->pool[--S->pool_n];
    pthread_mutex_unlock(&S->pool_lock);
    if (p == NULL && posix_memalign(&p, PAGE_BYTES, S->pool_cap) == 0)
        madvise(p, S->pool_cap, MADV_POPULATE_WRITE); /* (advice: one call instead of a fault per page) */
    return p;
}

static void pool_give(void *p) {
    pthread_mutex_lock(&S->pool_lock);
    if (S->pool_n < POOL_MAX) {
        S->pool[S->pool_n++] = p;
        p = NULL;
    }
    pthread_mutex_unlock(&S->pool_lock);
    free(p);
}

static void block_unref(block_t *b) {
    if (b != NULL && __atomic_sub_fetch(&b->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        if (b->pooled)
            pool_give(b->base);
        else
            free(b->base);
        free(b);
    }
}

static void lru_unlink(block_t *b) {
    if (!b->in_lru)
        return;
    if (b->lru_prev)
        b->lru_prev->lru_next = b->lru_next;
    else
        S->lru_head = b->lru_next;
    if (b->lru_next)
        b->lru_next->lru_prev = b->lru_prev;
    else
        S->lru_tail = b->lru_prev;
    b->lru_prev = b->lru_next = NULL;
    b->in_lru = 0;
}

static void lru_push(block_t *b) {
    b->lru_prev = NULL;
    b->lru_next = S->lru_head;
    if (S->lru_head)
        S->lru_head->lru_prev = b;
    S->lru_head = b;
    if (!S->lru_tail)
        S->lru_tail = b;
    b->in_lru = 1;
}

static uint64_t block_hash(long long chunk, long long idx) { return (uint64_t)(chunk * 1000003 + idx) % CBUCKETS; }

/* Take block b out of the cache (cache lock held); readers holding it keep it until they let go. */
static void evict(block_t *b) {
    block_t **pp = &S->cbuckets[block_hash(b->chunk, b->idx)];
    while (*pp && *pp != b)
        pp = &(*pp)->next;
    if (*pp == NULL)
        return; /* not in the cache (any more) */
    *pp = b->next;
    lru_unlink(b);
    S->cache_bytes -= b->len;
    block_unref(b);
}

/* A buffer for a block's bytes, its pages made at once (one call instead of a page fault per 4 KiB
 * page as the block is read in; advice only: an older kernel faults them in as usual). */
static uint8_t *block_buffer(size_t len) {
    uint8_t *p = malloc(len ? len : 1);
    if (p != NULL && len >= BUFFER_PREFAULT) {
        uintptr_t lo = ((uintptr_t)p + 4095) & ~(uintptr_t)4095, hi = ((uintptr_t)p + len) & ~(uintptr_t)4095;
        if (hi > lo)
            madvise((void *)lo, hi - lo, MADV_POPULATE_WRITE);
    }
    return p;
}

/* Read, check and decode the block file of piece pc into *data (its allocation *base, *out
 * bytes); 0, or -1 with msg. The same checks as the block engine's, in the same order. Read
 * buffered, the header first and then the payload: on this project's machines (virtio disks)
 * that reads a large file's 4 MiB blocks about twice as fast as one O_DIRECT read each
 * (benchmarks/RESULTS.md, "One large file through the native session"). */
static int load_block(const piece_t *pc, uint8_t **data, uint8_t **base, int *pooled, size_t *out, char *msg) {
    header_t hd;
    struct stat st;
    uint8_t head[HEADER_SIZE], *payload = NULL, *raw = NULL;
    size_t got, len, out_len;
    int rc = -1, raw_pooled = 0; /* raw is a pool buffer */
    int fd = open(pc->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(msg, MSG_LEN, "open: %s", strerror(errno));
        return -1;
    }
    if (fstat(fd, &st) != 0) {
        snprintf(msg, MSG_LEN, "read: %s", strerror(errno ? errno : EIO));
        goto done;
    }
    *pooled = 0;
    if (read_all(fd, head, HEADER_SIZE, 0, &got) != 0) {
        snprintf(msg, MSG_LEN, "read: %s", strerror(errno ? errno : EIO));
        goto done;
    }
    size_t size = (size_t)st.st_size > got ? (size_t)st.st_size : got;
    if (parse_header(head, got, &hd, msg) || payload_length(&hd, size - HEADER_SIZE, &len, msg) ||
        output_length(&hd, S->block_limit, &out_len, msg))
        goto done;
    /* a block near the largest size goes into a pool buffer: once the cache is full, each block read
     * takes the buffer of one evicted, its pages made already (making them was 13% of the daemon's CPU
     * per cold small file); smaller ones into a buffer of their size, not to hold a pool buffer each */
    raw_pooled = out_len >= S->pool_cap / 2 && out_len <= S->pool_cap && S->pool_cap > 0;
    if ((raw = raw_pooled ? pool_take() : block_buffer(out_len)) == NULL ||
        ((hd.flags & FLAG_LZ4) && (payload = malloc(len ? len : 1)) == NULL)) {
        snprintf(msg, MSG_LEN, "out of memory");
        goto done;
    }
    uint8_t *dst = (hd.flags & FLAG_LZ4) ? payload : raw;
    if (read_all(fd, dst, len, HEADER_SIZE, &got) != 0) {
        snprintf(msg, MSG_LEN, "read: %s", strerror(errno ? errno : EIO));
        goto done;
    }
    if (got != len) {
        snprintf(msg, MSG_LEN, "truncated payload (%zu of %u bytes)", got, hd.stored_len);
        goto done;
    }
    if (finish_block(&hd, dst, len, raw, out_len, block_seed(S->volume, pc->chunk, pc->idx), msg))
        goto done;
    *data = *base = raw;
    *pooled = raw_pooled;
    *out = out_len;
    raw = NULL;
    rc = 0;
done:
    close(fd);
    free(payload);
    if (raw_pooled && raw != NULL)
        pool_give(raw);
    else
        free(raw);
    return rc;
}

/* Whether block (chunk, idx) is in the cache or being read into it (cache lock held). */
static int cached(long long chunk, long long idx) {
    for (block_t *b = S->cbuckets[block_hash(chunk, idx)]; b; b = b->next)
        if (b->chunk == chunk && b->idx == idx)
            return 1;
    return 0;
}

/* Queue block (chunk, k) for the readahead threads when its file is known and it is not queued
 * yet (ra_lock held; a full queue drops it: readers then read it themselves). */
static void queue_ahead(long long chunk, long long k, int large) {
    if (S->ra_len >= RA_QUEUE)
        return;
    const bfile_t *f = S->fbuckets[bfile_hash(chunk, k)];
    while (f && (f->chunk != chunk || f->idx != k))
        f = f->next;
    if (f == NULL) /* unknown: past the chunk's end, or a block no listed file has bytes in */
        return;
    for (size_t i = 0; i < S->ra_len; i++) {
        size_t j = (S->ra_head + i) % RA_QUEUE;
        if (S->ra_queue[j].chunk == chunk && S->ra_queue[j].idx == k)
            return;
    }
    size_t tail = (S->ra_head + S->ra_len++) % RA_QUEUE;
    S->ra_queue[tail].chunk = chunk;
    S->ra_queue[tail].idx = k;
    S->ra_queue[tail].large = large;
}

/* Queue the RA_BLOCKS blocks after (chunk, idx) for the readahead threads (a reader going through
 * a chunk's small files in order). */
static void read_ahead(long long chunk, long long idx) {
    pthread_mutex_lock(&S->ra_lock);
    for (long long k = idx + 1; k <= idx + RA_BLOCKS; k++)
        queue_ahead(chunk, k, 0);
    pthread_cond_broadcast(&S->ra_wake);
    pthread_mutex_unlock(&S->ra_lock);
}

/* A directory was listed: queue the blocks holding its small files (not cached yet) for the
 * readahead threads, which read them while its first files are looked up and opened. Files of a
 * directory are mostly read together (a pass in directory order, a class folder), and they lie
 * in a few chunks written side by side, so going block after block within one chunk (read_ahead)
 * would find few of them in time; a random-order pass, touching every directory early, has every
 * block read once early, RA_THREADS at a time. Only while the cache has room for them. */
static void read_ahead_listed(const long long (*blocks)[2], size_t n) {
    int fresh_block[RA_LIST_BLOCKS] = {0};
    int any = 0;
    pthread_mutex_lock(&S->cache_lock);
    /* only into room the cache has: a listing's guess never evicts blocks readers use */
    size_t room = S->cache_bytes < S->cache_cap ? S->cache_cap - S->cache_bytes : 0;
    for (size_t i = 0; i < n && room >= S->block_limit; i++)
        if (!cached(blocks[i][0], blocks[i][1])) {
            any = fresh_block[i] = 1;
            room -= S->block_limit;
        }
    pthread_mutex_unlock(&S->cache_lock);
    if (!any)
        return;
    pthread_mutex_lock(&S->ra_lock);
    for (size_t i = 0; i < n; i++)
        if (fresh_block[i])
            queue_ahead(blocks[i][0], blocks[i][1], 0);
    pthread_cond_broadcast(&S->ra_wake);
    pthread_mutex_unlock(&S->ra_lock);
}

/* Whether an open file is a large one: more than a block, in more than one piece (a small file
 * across a block's end is not: its blocks are shared with other files, read the usual way). */
static int large_file(const openfile_t *of) { return of->pieces->n > 1 && of->size > S->block_limit; }

/* A reader going through a large file in order (READ at `start`, piece i): queue the blocks of the
 * next pieces, up to RA_FILE_BLOCKS blocks past piece i's, across chunk ends, each block once per
 * open file; the kernel's READs of one file come on several threads at once, so "in order" is a
 * READ starting within a few of them of where the last one ended. */
static int read_ahead_file(openfile_t *of, size_t i, uint64_t start, uint64_t end) {
    const pieces_t *p = of->pieces;
    uint64_t last = __atomic_exchange_n(&of->ra->next_off, end, __ATOMIC_RELAXED);
    uint64_t slack = 4 * (uint64_t)MAX_READ;
    if (!large_file(of) || start + slack < last || start > last + slack)
        return 0; /* a small file (chunk order reads ahead), or a random read */
    size_t upto = __atomic_load_n(&of->ra->ra_upto, __ATOMIC_RELAXED), j = i + 1, blocks = 0;
    long long chunk = p->p[i].chunk, idx = p->p[i].idx;
    pthread_mutex_lock(&S->ra_lock);
    for (; j < p->n && blocks < RA_FILE_BLOCKS; j++) {
        if (p->p[j].chunk == chunk && p->p[j].idx == idx)
            continue; /* the same block as the piece before */
        chunk = p->p[j].chunk;
        idx = p->p[j].idx;
        blocks++;
        if (j >= upto)
            queue_ahead(chunk, idx, 1);
    }
    pthread_cond_broadcast(&S->ra_wake);
    pthread_mutex_unlock(&S->ra_lock);
    while (upto < j && !__atomic_compare_exchange_n(&of->ra->ra_upto, &upto, j, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
    return 1;
}

/* `n` more bytes of block b given to a large file's in-order reader: once all of it was, it leaves
 * the cache (the kernel's page cache holds those bytes now), its buffer back to the pool for the
 * blocks ahead. */
static void served(block_t *b, size_t n) {
    if (__atomic_add_fetch(&b->served, n, __ATOMIC_RELAXED) < b->len)
        return;
    pthread_mutex_lock(&S->cache_lock);
    evict(b);
    pthread_mutex_unlock(&S->cache_lock);
}

/* The block holding piece pc, long enough for it, with a reference for the caller; NULL if the
 * native path cannot read it (the caller falls back to Python). One thread reads a missing block
 * while the others asking for it wait (a sequential read's readahead asks for one block many
 * times at once). A block that grows in place may be cached shorter than a later piece needs:
 * then it is read again. */
static block_t *get_block(const piece_t *pc, int ahead, int large) {
    uint64_t h = block_hash(pc->chunk, pc->idx);
    size_t need = pc->block_lo + pc->len;
    pthread_mutex_lock(&S->cache_lock);
    for (block_t *b = S->cbuckets[h]; b; b = b->next) {
        if (b->chunk != pc->chunk || b->idx != pc->idx)
            continue;
        __atomic_add_fetch(&b->refs, 1, __ATOMIC_ACQ_REL);
        while (b->loading)
            pthread_cond_wait(&S->loaded, &S->cache_lock);
        if (!b->failed && b->len >= need) {
            if (b->in_lru && !ahead) {
                lru_unlink(b);
                lru_push(b);
            }
            int first_use = b->ahead && !ahead; /* the reader caught up with the readahead: keep ahead */
            if (first_use)
                b->ahead = 0;
            pthread_mutex_unlock(&S->cache_lock);
            if (first_use && !large) /* (a large file's reader reads ahead in file order: read_ahead_file) */
                read_ahead(pc->chunk, pc->idx);
            return b;
        }
        int failed = b->failed;
        if (!failed)
            evict(b); /* too short: a block that grew since; read it again below */
        pthread_mutex_unlock(&S->cache_lock);
        block_unref(b);
        if (failed)
            return NULL;
        pthread_mutex_lock(&S->cache_lock);
        break;
    }
    block_t *b = calloc(1, sizeof *b);
    if (b == NULL) {
        pthread_mutex_unlock(&S->cache_lock);
        return NULL;
    }
    b->chunk = pc->chunk;
    b->idx = pc->idx;
    b->ahead = ahead;
    b->loading = 1;
    b->refs = 2; /* the cache's and ours */
    b->next = S->cbuckets[h];
    S->cbuckets[h] = b;
    pthread_mutex_unlock(&S->cache_lock);
    char msg[MSG_LEN];
    uint8_t *data = NULL, *base = NULL;
    size_t len = 0;
    int pooled = 0;
    int bad = load_block(pc, &data, &base, &pooled, &len, msg);
    if (bad && !ahead) /* (a readahead's failure is the reader's to report, when it reads the block itself) */
        fprintf(stderr, "balefs native session: chunk %lld block %lld (%s): %s; reading it the Python way\n", pc->chunk,
                pc->idx, pc->path, msg);
    pthread_mutex_lock(&S->cache_lock);
    b->loading = 0;
    if (bad) {
        b->failed = 1;
        evict(b);
    } else {
        b->data = data;
        b->base = base;
        b->pooled = pooled;
        b->len = len;
        S->cache_bytes += len;
        lru_push(b);
        while (S->cache_bytes > S->cache_cap && S->lru_tail)
            evict(S->lru_tail); /* (this block too, if it alone is more than the cache holds) */
    }
    /* a reader going through the chunk in order (its previous block is here): read ahead of it */
    int sequential = !bad && !ahead && !large && pc->idx > 0 && cached(pc->chunk, pc->idx - 1);
    pthread_cond_broadcast(&S->loaded);
    pthread_mutex_unlock(&S->cache_lock);
    if (sequential)
        read_ahead(pc->chunk, pc->idx);
    if (bad || len < need) {
        block_unref(b);
        return NULL;
    }
    return b;
}

/* A readahead thread (RA_THREADS of them): reads queued blocks into the cache until told to stop. */
static void policy_came_late(void);

static void drop_all_pages(void);

/* With no OPEN, nothing asks whether opens need checking while every read hits the kernel's cache:
 * this thread asks every POLICY_TTL seconds until the session ends or the answer is yes, and then
 * drops the kernel's pages of every file, once. Only this thread drops them: a READ handler that did
 * would wait for the pages its own reply is to fill. */
static void *policy_main(void *arg) {
    (void)arg;
    int dropped = 0;
    pthread_mutex_lock(&S->ra_lock);
    while (!S->ra_stop && !dropped) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += (time_t)POLICY_TTL;
        pthread_cond_timedwait(&S->ra_wake, &S->ra_lock, &until);
        if (S->ra_stop || !S->no_open)
            continue;
        pthread_mutex_unlock(&S->ra_lock);
        if (!__atomic_load_n(&S->policy_late, __ATOMIC_ACQUIRE) && policy_checks())
            policy_came_late();
        if (__atomic_load_n(&S->policy_late, __ATOMIC_ACQUIRE)) {
            fprintf(stderr, "balefs native session: grants or a read audit were set up after this read-only mount "
                            "started (--cached-opens); its reads are checked from now on, but only a new mount "
                            "checks every open\n");
            drop_all_pages();
            dropped = 1;
        }
        pthread_mutex_lock(&S->ra_lock);
    }
    pthread_mutex_unlock(&S->ra_lock);
    return NULL;
}

static void *readahead_main(void *arg) {
    (void)arg;
    char path[4096 + 1];
    for (;;) {
        pthread_mutex_lock(&S->ra_lock);
        while (S->ra_len == 0 && !S->ra_stop)
            pthread_cond_wait(&S->ra_wake, &S->ra_lock);
        if (S->ra_stop) {
            pthread_mutex_unlock(&S->ra_lock);
            return NULL;
        }
        piece_t pc = {.chunk = S->ra_queue[S->ra_head].chunk, .idx = S->ra_queue[S->ra_head].idx, .path = path};
        int large = S->ra_queue[S->ra_head].large;
        S->ra_head = (S->ra_head + 1) % RA_QUEUE;
        S->ra_len--;
        const bfile_t *f = S->fbuckets[bfile_hash(pc.chunk, pc.idx)];
        while (f && (f->chunk != pc.chunk || f->idx != pc.idx))
            f = f->next;
        int known = f != NULL && strlen(f->path) < sizeof path;
        if (known)
            strcpy(path, f->path);
        pthread_mutex_unlock(&S->ra_lock);
        if (known)
            block_unref(get_block(&pc, 1, large)); /* (one already cached or being read: nothing to do) */
    }
}

/* -- FUSE operations ------------------------------------------------------------------------------ */

static void reply_entry(fuse_req_t req, const struct stat *st) {
    struct fuse_entry_param e;
    memset(&e, 0, sizeof e);
    e.ino = st->st_ino;
    e.attr = *st;
    e.attr_timeout = S->attr_timeout;
    e.entry_timeout = S->entry_timeout;
    fuse_reply_entry(req, &e);
}

static void reply_missing(fuse_req_t req) {
    if (S->negative_timeout > 0) { /* cache the absence in the kernel */
        struct fuse_entry_param e;
        memset(&e, 0, sizeof e);
        e.entry_timeout = S->negative_timeout;
        fuse_reply_entry(req, &e);
    } else {
        fuse_reply_err(req, ENOENT);
    }
}

static void op_init(void *userdata, struct fuse_conn_info *conn) {
    (void)userdata;
    conn->max_read = MAX_READ;
    if (conn->max_background < 128)
        conn->max_background = 128;
    if (conn->congestion_threshold < 96)
        conn->congestion_threshold = 96;
    PyGILState_STATE g = gil();
    PyObject *r = call("ready", "()");
    Py_XDECREF(r);
    r = call("relatime", "()");
    S->relatime = r == Py_True;
    Py_XDECREF(r);
    /* generation_source() -> (file bytes, query bytes) or None */
    PyObject *src = call("generation_source", "()");
    const char *path, *sql;
    if (src != NULL && PyTuple_Check(src)) {
        if (PyArg_ParseTuple(src, "yy", &path, &sql)) {
            S->gen_path = strdup(path);
            S->gen_sql = strdup(sql);
            if (S->gen_path == NULL || S->gen_sql == NULL) {
                free(S->gen_path);
                free(S->gen_sql);
                S->gen_path = S->gen_sql = NULL;
            }
        } else {
            PyErr_WriteUnraisable(S->provider);
        }
    }
    Py_XDECREF(src);
    /* no OPEN only where the session reads the counter itself (SQLite): a PostgreSQL volume's opens
     * ask Python for it anyway, and its grants are the store's to enforce at each one */
    r = S->gen_path != NULL ? call("skips_opens", "()") : NULL;
    S->no_open = r == Py_True;
    Py_XDECREF(r);
    PyErr_Clear();
    if (S->no_open) { /* which says the policy checks nothing now */
        pthread_mutex_lock(&S->policy_lock);
        S->opens_checked = 0;
        S->policy_at = now_s();
        pthread_mutex_unlock(&S->policy_lock);
    }
    PyGILState_Release(g);
}

/* Look `name` up in a listed directory node (lock held): its inode number, or 0. */
static uint64_t find_kid(node_t *d, const char *name) {
    size_t lo = 0, hi = d->nkids;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int c = strcmp(d->kids[mid].name, name);
        if (c == 0)
            return d->kids[mid].ino;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return 0;
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
    if (strlen(name) > NAME_MAX_BYTES) {
        fuse_reply_err(req, ENAMETOOLONG);
        return;
    }
    struct stat st;
    for (int attempt = 0; attempt < 2; attempt++) {
        pthread_mutex_lock(&S->lock);
        node_t *d = find(parent);
        int files_hold = 0;
        if (d != NULL && d->listed && !fresh(d->listed_gen, d->listed_at) && d->listed_gen == S->seen_gen) {
            /* past the TTL: if the counter has not moved, its entries of files are still exact */
            long long listed_gen = d->listed_gen;
            pthread_mutex_unlock(&S->lock);
            long long gen = counter_now();
            pthread_mutex_lock(&S->lock);
            if (gen > S->seen_gen)
                S->seen_gen = gen;
            d = find(parent);
            files_hold = gen >= 0 && gen == listed_gen && d != NULL && d->listed && d->listed_gen == listed_gen;
        }
        if (d != NULL && d->listed && (files_hold || fresh(d->listed_gen, d->listed_at))) {
            uint64_t ino = find_kid(d, name);
            node_t *n = ino ? find(ino) : NULL;
            if (n != NULL && !(files_hold && S_ISDIR(n->st.st_mode))) {
                st = n->st;
                n->nlookup++;
                n->given = n->stamp;
                pthread_mutex_unlock(&S->lock);
                reply_entry(req, &st);
                return;
            }
            if (n == NULL) {
                pthread_mutex_unlock(&S->lock);
                break; /* not in the listing: created since? ask Python below */
            }
            /* a directory's attributes (link count, times) change without the counter: list again */
        }
        /* a directory this mount just changed (cp -r into it): one name, not the whole listing again */
        int changed_here = d != NULL && d->listed && d->listed_gen == LLONG_MIN;
        pthread_mutex_unlock(&S->lock);
        if (changed_here)
            break;
        if (attempt == 0) {
            int err = relist_shared(parent); /* one call for every entry of the directory */
            if (err) {
                fuse_reply_err(req, err);
                return;
            }
        }
    }
    int err = fetch(&st, "lookup", "(Ky)", (unsigned long long)parent, name);
    if (err == ENOENT) {
        reply_missing(req);
    } else if (err) {
        fuse_reply_err(req, err);
    } else {
        pthread_mutex_lock(&S->lock);
        referenced(st.st_ino);
        pthread_mutex_unlock(&S->lock);
        reply_entry(req, &st);
    }
}

/* The kernel dropped `count` references to `ino` (lock held): a node it no longer holds leaves the
 * table (read again if asked for). */
static void forget_one(uint64_t ino, uint64_t count) {
    node_t *n = find(ino);
    if (n == NULL)
        return;
    n->nlookup = n->nlookup > count ? n->nlookup - count : 0;
    drop_if_unused(ino);
}

static void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) {
    pthread_mutex_lock(&S->lock);
    forget_one(ino, nlookup);
    pthread_mutex_unlock(&S->lock);
    fuse_reply_none(req);
}

static void op_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets) {
    pthread_mutex_lock(&S->lock);
    for (size_t i = 0; i < count; i++)
        forget_one(forgets[i].ino, forgets[i].nlookup);
    pthread_mutex_unlock(&S->lock);
    fuse_reply_none(req);
}

/* A GETATTR's or SETATTR's reply: the attributes, or the errno when err is not 0. */
static void reply_attr(fuse_req_t req, int err, const struct stat *st) {
    if (err)
        fuse_reply_err(req, err);
    else
        fuse_reply_attr(req, st, S->attr_timeout);
}

/* Attributes of `ino` handed to the kernel (lock taken here): the version it now holds. */
static void gave_attrs(uint64_t ino) {
    pthread_mutex_lock(&S->lock);
    node_t *n = find(ino);
    if (n != NULL)
        n->given = n->stamp;
    pthread_mutex_unlock(&S->lock);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)fi;
    struct stat st;
    int py = 0;
    for (int attempt = 0; attempt < 2; attempt++) {
        pthread_mutex_lock(&S->lock);
        node_t *n = find(ino);
        py = n != NULL && n->py > 0;
        if (py) {
            pthread_mutex_unlock(&S->lock);
            break;
        }
        /* past the TTL a file's attributes still hold while the counter has not moved (they change
         * only with it, access times aside), as a listing's files do for LOOKUP */
        if (n != NULL && (fresh(n->gen, n->at) || (attempt == 1 && S_ISREG(n->st.st_mode) && n->gen == S->seen_gen))) {
            st = n->st;
            n->given = n->stamp;
            pthread_mutex_unlock(&S->lock);
            fuse_reply_attr(req, &st, S->attr_timeout);
            return;
        }
        int may_hold = attempt == 0 && n != NULL && S_ISREG(n->st.st_mode) && n->gen == S->seen_gen;
        long long had = may_hold ? n->gen : 0;
        pthread_mutex_unlock(&S->lock);
        if (!may_hold)
            break;
        long long gen = counter_now();
        pthread_mutex_lock(&S->lock);
        if (gen > S->seen_gen)
            S->seen_gen = gen;
        pthread_mutex_unlock(&S->lock);
        if (gen < 0 || gen != had) /* moved (or not readable here: PostgreSQL): read it again */
            break;
    }
    if (py) { /* its size and times may be unflushed ones: from Python, not kept */
        settle_ino(ino);
        PyGILState_STATE g = gil();
        PyObject *r = call("attrs", "(K)", (unsigned long long)ino);
        int err = err_of(r);
        if (!err && parse_attrs(r, &st) != 0) {
            PyErr_WriteUnraisable(S->provider);
            err = EIO;
        }
        Py_XDECREF(r);
        PyGILState_Release(g);
        if (err)
            fuse_reply_err(req, err);
        else /* the kernel keeps them no longer than a read-write mount's default: the writer goes on */
            fuse_reply_attr(req, &st, S->attr_timeout < PY_ATTR_TIMEOUT ? S->attr_timeout : PY_ATTR_TIMEOUT);
        return;
    }
    int err = fetch(&st, "getattr", "(K)", (unsigned long long)ino, NULL);
    if (!err)
        gave_attrs(ino);
    reply_attr(req, err, &st);
}

/* -- files with Python handles -------------------------------------------------------------------
 * A file opened for writing (or with O_TRUNC) is opened by the Python operations (ops.py, through
 * the provider), and every call on that handle goes there; so does any open of a file that has a
 * Python handle, its GETATTR (its size and times may be unflushed ones) and a native handle's read
 * of it while it holds unflushed writes. A file unlinked while open is kept under a hidden name by
 * the provider (as libfuse's high-level API does) and unlinked here at its last close. */

#define CTX(req) (unsigned long long)fuse_req_ctx(req)->uid, (unsigned long long)fuse_req_ctx(req)->gid, \
                 (unsigned long long)fuse_req_ctx(req)->pid
#define CTX_FMT "(KKK)"

/* Whether `ino` has a Python handle open (without the lock while no file has one). */
static int has_python_handles(uint64_t ino) {
    if (__atomic_load_n(&S->pyhandles, __ATOMIC_ACQUIRE) == 0)
        return 0;
    pthread_mutex_lock(&S->lock);
    node_t *n = find(ino);
    int py = n != NULL && n->py > 0;
    pthread_mutex_unlock(&S->lock);
    return py;
}

/* A provider's non-negative number (a generation, bytes written, an atime), or -errno; GIL held. */
static long long gen_of(PyObject *r) {
    if (r == NULL || !PyLong_Check(r))
        return -EIO;
    long long v = PyLong_AsLongLong(r);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_WriteUnraisable(S->provider);
        return -EIO;
    }
    return v;
}

/* -- gathered writes -----------------------------------------------------------------------------
 * The kernel sends the pieces of one write() (up to 1 MiB each) one after another, each only after
 * the reply to the last, so a large write waited for Python at every MiB. A Python handle that has
 * written GATHER_AFTER bytes in order has its next in-order WRITEs copied into a buffer here and
 * answered at once. A full buffer (GATHER_BYTES) is handed to Python (fh_write, one call) by the
 * thread that filled it, after its reply, while the kernel's next pieces fill the handle's other
 * buffer: the copy from the kernel and Python's work on the bytes overlap.
 *
 * Every other call that reaches Python about the inode first hands over what its handles gathered
 * (settle_ino): GETATTR (the size), SETATTR, OPEN, LINK, a READ of unflushed data, a WRITE out of
 * order or through another handle, FLUSH, FSYNC, RELEASE. So Python sees the writes in the order
 * they were answered, and nothing is committed without them. A handover that fails (ENOSPC, EIO)
 * fails the handle in Python (fh_fail): like any failed write it is never committed, the file keeps
 * its committed version, and its next WRITE, FLUSH, FSYNC and close answer the error, as a buffered
 * write's error comes back from a later call. Once Python answers any call on the handle with an
 * error, its WRITEs go to Python one by one again (stop_gather), each with Python's own answer.
 * Bytes gathered and not yet committed are lost with the daemon, as unflushed bytes in Python are:
 * a commit (FLUSH, FSYNC) always settles first. */

static void gather_unref(gather_t *g) {
    pthread_mutex_lock(&S->gathers_lock);
    int last = --g->refs == 0;
    pthread_mutex_unlock(&S->gathers_lock);
    if (!last)
        return;
    free(g->buf[0]);
    free(g->buf[1]);
    pthread_mutex_destroy(&g->lock);
    pthread_cond_destroy(&g->idle);
    free(g);
}

/* Hand `len` bytes of buffer `i` (file offset `at`) to Python as a view of it, then mark the
 * handover done; on an error the handle is failed in Python as well. No lock held. */
static void hand_over(gather_t *g, int i, size_t len, uint64_t at) {
    PyGILState_STATE st = gil();
    PyObject *view = PyMemoryView_FromMemory(g->buf[i], (Py_ssize_t)len, PyBUF_READ);
    if (view == NULL)
        PyErr_WriteUnraisable(S->provider);
    PyObject *r = view ? call("fh_write", "(KKOL)", (unsigned long long)g->ino, (unsigned long long)g->pyfh, view,
                              (long long)at)
                       : NULL;
    long long n = gen_of(r);
    Py_XDECREF(r);
    int err = n < 0 ? (int)-n : (size_t)n != len ? EIO : 0;
    int kept = 0;
    if (view != NULL) {
        PyObject *done = PyObject_CallMethod(view, "release", NULL);
        if (done == NULL) { /* Python holds a view of the buffer still: it is never written again */
            PyErr_WriteUnraisable(S->provider);
            kept = 1;
        }
        Py_XDECREF(done);
        Py_DECREF(view);
    }
    if (err) {
        PyObject *f = call("fh_fail", "(KKi)", (unsigned long long)g->ino, (unsigned long long)g->pyfh, err);
        Py_XDECREF(f);
    }
    PyGILState_Release(st);
    pthread_mutex_lock(&g->lock);
    if (kept)
        g->buf[i] = NULL; /* (left allocated on purpose) */
    if (err && !g->err)
        g->err = err;
    g->busy = 0;
    pthread_cond_broadcast(&g->idle);
    pthread_mutex_unlock(&g->lock);
}

/* Hand over everything `g` gathered before this call; its error, 0 if none. No lock held. */
static int settle(gather_t *g) {
    pthread_mutex_lock(&g->lock);
    while (g->busy)
        pthread_cond_wait(&g->idle, &g->lock);
    size_t len = g->fill;
    int i = g->cur;
    uint64_t at = g->start;
    if (len) {
        g->fill = 0;
        g->start += len;
        g->cur ^= 1;
        g->busy = !g->err; /* a failed handle's bytes are dropped: they are never committed */
    }
    int handing = g->busy;
    pthread_mutex_unlock(&g->lock);
    if (handing)
        hand_over(g, i, len, at);
    pthread_mutex_lock(&g->lock);
    int err = g->err;
    pthread_mutex_unlock(&g->lock);
    return err;
}

/* Settle every gathering handle of `ino` (a call about the inode is on its way to Python). */
static void settle_ino(uint64_t ino) {
    if (__atomic_load_n(&S->ngathers, __ATOMIC_ACQUIRE) == 0)
        return;
    gather_t *found[GATHER_MAX];
    size_t k = 0;
    pthread_mutex_lock(&S->gathers_lock);
    for (gather_t *g = S->gathers; g != NULL && k < GATHER_MAX; g = g->next)
        if (g->ino == ino) {
            g->refs++;
            found[k++] = g;
        }
    pthread_mutex_unlock(&S->gathers_lock);
    for (size_t i = 0; i < k; i++) {
        settle(found[i]);
        gather_unref(found[i]);
    }
}

/* Start gathering the WRITEs of `of` from file offset `at`: its gather, or NULL (GATHER_MAX handles
 * gather already, or no memory: its WRITEs go to Python one by one). */
static gather_t *start_gather(openfile_t *of, uint64_t at) {
    gather_t *g = calloc(1, sizeof *g);
    if (g == NULL)
        return NULL;
    g->ino = of->ino;
    g->pyfh = of->pyfh;
    g->start = at;
    g->refs = 1;
    pthread_mutex_init(&g->lock, NULL);
    pthread_cond_init(&g->idle, NULL);
    pthread_mutex_lock(&S->gathers_lock);
    gather_t *had = __atomic_load_n(&of->gather, __ATOMIC_ACQUIRE);
    if (had == NULL && S->ngathers < GATHER_MAX) {
        g->next = S->gathers;
        S->gathers = g;
        __atomic_add_fetch(&S->ngathers, 1, __ATOMIC_ACQ_REL);
        __atomic_store_n(&of->gather, g, __ATOMIC_RELEASE);
        had = g;
        g = NULL;
    }
    pthread_mutex_unlock(&S->gathers_lock);
    if (g != NULL)
        gather_unref(g);
    return had;
}

/* RELEASE of a gathering handle: hand over what it gathered and stop gathering; its error or 0. */
static int end_gather(openfile_t *of) {
    gather_t *g = of->gather;
    if (g == NULL)
        return 0;
    int err = settle(g);
    pthread_mutex_lock(&S->gathers_lock);
    for (gather_t **pp = &S->gathers; *pp != NULL; pp = &(*pp)->next)
        if (*pp == g) {
            *pp = g->next;
            __atomic_sub_fetch(&S->ngathers, 1, __ATOMIC_ACQ_REL);
            break;
        }
    pthread_mutex_unlock(&S->gathers_lock);
    of->gather = NULL;
    gather_unref(g);
    return err;
}

/* Python answered a call on handle `of` with an error (it may have failed the handle): its next
 * WRITEs go to Python one by one, so that each gets Python's answer, not a deferred one. */
static void stop_gather(openfile_t *of) {
    gather_t *g = __atomic_load_n(&of->gather, __ATOMIC_ACQUIRE);
    if (g != NULL) {
        pthread_mutex_lock(&g->lock);
        g->stopped = 1;
        pthread_mutex_unlock(&g->lock);
    }
}

/* Whether WRITE (off, size) continues `g`'s writes in order but does not fit its buffer: the buffer is
 * handed over first (lock held). */
static int fills_up(const gather_t *g, uint64_t off, size_t size) {
    return !g->err && off == g->start + g->fill && g->fill + size > GATHER_BYTES;
}

/* A WRITE of Python handle `of`, gathered here if it may be: whether it was (and answered). */
static int write_gathered(fuse_req_t req, openfile_t *of, const char *data, size_t size, uint64_t off) {
    gather_t *g = __atomic_load_n(&of->gather, __ATOMIC_ACQUIRE);
    if (size == 0 || size > GATHER_BYTES || off + size > S->max_file || off + size < off)
        return 0;
    if (g == NULL) {
        if (off != of->wnext || of->wrun < GATHER_AFTER || (g = start_gather(of, off)) == NULL)
            return 0;
    }
    pthread_mutex_lock(&g->lock);
    if (g->stopped && !g->err) {
        pthread_mutex_unlock(&g->lock);
        settle(g);
        return 0;
    }
    while (fills_up(g, off, size) && g->busy) /* the other buffer is still with Python: the kernel waits */
        pthread_cond_wait(&g->idle, &g->lock);
    int give = -1;
    size_t glen = 0;
    uint64_t gat = 0;
    if (fills_up(g, off, size)) {
        if (g->buf[g->cur ^ 1] == NULL && (g->buf[g->cur ^ 1] = malloc(GATHER_BYTES)) == NULL) {
            pthread_mutex_unlock(&g->lock);
            settle(g);
            return 0;
        }
        give = g->cur;
        glen = g->fill;
        gat = g->start;
        g->busy = 1;
        g->cur ^= 1;
        g->start += glen;
        g->fill = 0;
    }
    int err = g->err;
    int fits = !err && off == g->start + g->fill;
    if (fits && g->buf[g->cur] == NULL && (g->buf[g->cur] = malloc(GATHER_BYTES)) == NULL)
        fits = 0;
    if (fits) {
        memcpy(g->buf[g->cur] + g->fill, data, size);
        g->fill += size;
        of->wnext = off + size;
    }
    pthread_mutex_unlock(&g->lock);
    if (fits)
        fuse_reply_write(req, size);
    else if (err)
        fuse_reply_err(req, err);
    if (give >= 0)
        hand_over(g, give, glen, gat);
    if (fits || err)
        return 1;
    settle(g); /* out of order (or no memory): what came before goes first, then this one to Python */
    return 0;
}

/* A change made through this mount left the metadata at generation `gen`: every entry of the table
 * read before it is stale from now on (read again when next asked for). */
static void changed(long long gen) {
    pthread_mutex_lock(&S->lock);
    if (gen > S->seen_gen)
        S->seen_gen = gen;
    pthread_mutex_unlock(&S->lock);
}

/* Forget what the table holds of `ino`: its attributes and listing are read again when next asked
 * for (lock held). Not every change moves the generation (a new entry makes no lookup wrong), so
 * each forwarded change names the inodes it touched. */
static void stale(uint64_t ino) {
    node_t *n = find(ino);
    if (n != NULL) {
        n->gen = LLONG_MIN;
        n->listed_gen = LLONG_MIN;
    }
}

/* The result of a forwarded change, (gen, (ino, ...)): the generation after it, noted, and the
 * inodes it touched made stale; 0 or an errno. GIL held. */
static int took_change(PyObject *r) {
    int err = err_of(r);
    long long gen;
    PyObject *inos;
    if (err)
        return err;
    if (!PyArg_ParseTuple(r, "LO!", &gen, &PyTuple_Type, &inos)) {
        PyErr_WriteUnraisable(S->provider);
        return EIO;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(inos);
    uint64_t touched[8];
    size_t k = 0;
    late_err_t bad = {NULL, NULL, NULL};
    pthread_mutex_lock(&S->lock);
    if (gen > S->seen_gen)
        S->seen_gen = gen;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long ino = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(inos, i));
        if (ino == (unsigned long long)-1 && PyErr_Occurred()) {
            err_keep(&bad);
            continue;
        }
        stale(ino);
        if (k < sizeof touched / sizeof *touched)
            touched[k++] = ino;
    }
    pthread_mutex_unlock(&S->lock);
    err_report(&bad);
    /* the kernel keeps attributes long on a read-write mount too: it drops its copy of what changed
     * (times, link counts a change it did not ask for moved: a hidden rename, a commit at close) */
    for (size_t i = 0; i < k; i++)
        fuse_lowlevel_notify_inval_inode(S->se, touched[i], -1, 0);
    return 0;
}

/* A handle of `ino` was closed (`py`: a Python one); at the last close of a hidden file, its hidden
 * name is unlinked. */
static void closed(uint64_t ino, int py) {
    pthread_mutex_lock(&S->lock);
    node_t *n = find(ino);
    int unlink_hidden = 0;
    if (n != NULL) {
        if (n->opens > 0)
            n->opens--;
        if (py && n->py > 0) {
            n->py--;
            n->gen = LLONG_MIN; /* its unflushed size may be in the table: read it again */
        }
        unlink_hidden = n->hidden && n->opens == 0;
        if (unlink_hidden)
            n->hidden = 0;
    }
    if (py)
        __atomic_sub_fetch(&S->pyhandles, 1, __ATOMIC_ACQ_REL);
    pthread_mutex_unlock(&S->lock);
    if (unlink_hidden) {
        PyGILState_STATE g = gil();
        PyObject *r = call("unlink_hidden", "(K)", (unsigned long long)ino);
        took_change(r);
        Py_XDECREF(r);
        PyGILState_Release(g);
    }
}

/* Count a Python handle of `ino` just opened (lock taken here). */
static void opened_python(uint64_t ino) {
    pthread_mutex_lock(&S->lock);
    node_t *n = find_or_add(ino);
    if (n != NULL) {
        n->opens++;
        n->py++;
    }
    __atomic_add_fetch(&S->pyhandles, 1, __ATOMIC_ACQ_REL);
    pthread_mutex_unlock(&S->lock);
}

/* Whether a handle is opened write-only: its WRITEs then come straight from the writer's pages
 * (direct_io), not through the kernel's page cache: one copy of every byte less, and no cache filled
 * with bytes nobody reads through it. Reads of the file on other handles come here and see them (as
 * unflushed writes); after the commit, the next open drops the cached pages of the old version. */
static int write_only(const struct fuse_file_info *fi) { return (fi->flags & O_ACCMODE) == O_WRONLY; }

/* A new openfile_t for Python handle `fh` (kept by the kernel in fi->fh), or NULL. */
static openfile_t *python_file(uint64_t ino, uint64_t fh) {
    openfile_t *of = calloc(1, sizeof *of);
    if (of != NULL) {
        of->ino = ino;
        of->pyfh = fh;
        of->ra = &of->own;
    }
    return of;
}

static void release_python(fuse_req_t req, uint64_t ino, openfile_t *of);

/* OPEN through Python: provider.open(ctx, ino, flags) -> (gen, fh, keep_cache). */
static void open_python(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    PyGILState_STATE g = gil();
    PyObject *r = call("open", "(" CTX_FMT "Ki)", CTX(req), (unsigned long long)ino, fi->flags);
    long long gen = -1;
    unsigned long long fh = 0;
    int keep = 0, err = err_of(r);
    if (!err && !PyArg_ParseTuple(r, "LKp", &gen, &fh, &keep)) {
        PyErr_WriteUnraisable(S->provider);
        err = EIO;
    }
    Py_XDECREF(r);
    PyGILState_Release(g);
    openfile_t *of = err ? NULL : python_file(ino, fh);
    if (!err && of == NULL)
        err = ENOMEM; /* (the Python handle stays open until the session ends) */
    if (err) {
        fuse_reply_err(req, err == ENOENT ? ESTALE : err);
        return;
    }
    changed(gen);
    opened_python(ino);
    fi->fh = (uint64_t)(uintptr_t)of;
    fi->keep_cache = keep;
    fi->direct_io = write_only(fi);
    if (fuse_reply_open(req, fi) != 0)
        release_python(NULL, ino, of);
}

/* provider.<method>(...) -> bytes, replied as a READ's data (GIL taken here); 0, or 1 when the
 * provider answered None (nothing for it to serve: the caller reads natively). */
static int reply_read(fuse_req_t req, size_t size, PyObject *r) {
    int err = err_of(r);
    if (r == Py_None)
        return 1;
    if (err) {
        fuse_reply_err(req, err);
    } else if (!PyBytes_Check(r) || (size_t)PyBytes_GET_SIZE(r) > size) {
        fuse_reply_err(req, EIO);
    } else {
        char *data = PyBytes_AS_STRING(r);
        size_t n = (size_t)PyBytes_GET_SIZE(r);
        Py_BEGIN_ALLOW_THREADS
        fuse_reply_buf(req, data, n);
        Py_END_ALLOW_THREADS
    }
    return 0;
}

/* READ through Python: of a Python handle (`fh`), or through a native handle of a file that has
 * unflushed writes in this session (fh 0: the provider answers None when it has none). Whether it
 * replied. */
static int read_unflushed(fuse_req_t req, uint64_t ino, uint64_t fh, size_t size, off_t off) {
    settle_ino(ino);
    PyGILState_STATE g = gil();
    PyObject *r = call("fh_read", "(KKKn)", (unsigned long long)ino, (unsigned long long)fh, (unsigned long long)off,
                       (Py_ssize_t)size);
    int none = reply_read(req, size, r);
    Py_XDECREF(r);
    PyGILState_Release(g);
    return !none;
}

/* RELEASE of a Python handle: provider.fh_release(ino, fh) commits what is unflushed (req NULL:
 * the kernel never got the handle). */
static void release_python(fuse_req_t req, uint64_t ino, openfile_t *of) {
    end_gather(of);
    settle_ino(ino);
    PyGILState_STATE g = gil();
    PyObject *r = call("fh_release", "(KK)", (unsigned long long)ino, (unsigned long long)of->pyfh);
    took_change(r);
    Py_XDECREF(r);
    PyGILState_Release(g);
    free(of);
    closed(ino, 1);
    if (req != NULL)
        fuse_reply_err(req, 0);
}

/* provider.opened(ino, uid): the metadata's change counter (close-to-open), or -errno (a grant
 * that does not let the caller read the file: EACCES). */
static long long generation(uint64_t ino, uid_t uid) {
    PyGILState_STATE g = gil();
    PyObject *r = call("opened", "(KK)", (unsigned long long)ino, (unsigned long long)uid);
    long long gen = r ? PyLong_AsLongLong(r) : -EIO;
    if (gen == -1 && PyErr_Occurred()) {
        PyErr_WriteUnraisable(S->provider);
        gen = -EIO;
    }
    Py_XDECREF(r);
    PyGILState_Release(g);
    return gen;
}

static void open_python(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);

/* At the first open of a small file's version, hand the kernel its whole content (notify_store into
 * its page cache, before the open is answered) so that reading it needs no READ request: a cold file
 * costs LOOKUP, OPEN and RELEASE. Whether every byte was stored: then the open keeps the cache. Stores
 * go one at a time and only while the table still holds the version opened (`stamp`), so an open of
 * an older version never stores its bytes over a newer one's. */
static int store_at_open(uint64_t ino, const openfile_t *of, uint64_t stamp) {
    const pieces_t *p = of->pieces;
    if (p == NULL || of->size == 0 || of->size > STORE_MAX || p->n == 0 || p->n > STORE_PIECES)
        return 0;
    for (size_t i = 0, end = 0; i < p->n; end = p->p[i].file_off + p->p[i].len, i++)
        if (p->p[i].file_off != end) /* a hole (reads as zeros): left to READ */
            return 0;
    if (p->p[p->n - 1].file_off + p->p[p->n - 1].len != of->size)
        return 0;
    block_t *held[STORE_PIECES] = {NULL};
    size_t k = 0;
    for (; k < p->n; k++)
        if ((held[k] = get_block(&p->p[k], 0, 0)) == NULL)
            break;
    int stored = 0;
    uint8_t *joined = NULL; /* a file of several pieces is stored as one buffer of its bytes in order */
    if (k == p->n && p->n > 1 && (joined = malloc((size_t)of->size)) != NULL)
        for (size_t i = 0; i < p->n; i++)
            memcpy(joined + p->p[i].file_off, held[i]->data + p->p[i].block_lo, (size_t)p->p[i].len);
    if (k == p->n && (p->n == 1 || joined != NULL)) {
        struct fuse_bufvec v = FUSE_BUFVEC_INIT((size_t)of->size);
        v.buf[0].mem = joined != NULL ? joined : held[0]->data + p->p[0].block_lo;
        pthread_mutex_lock(&S->store_lock);
        pthread_mutex_lock(&S->lock);
        node_t *n = find(ino);
        int current = n != NULL && n->stamp == stamp;
        pthread_mutex_unlock(&S->lock);
        stored = current && fuse_lowlevel_notify_store(S->se, ino, 0, &v, 0) == 0;
        pthread_mutex_unlock(&S->store_lock);
    }
    free(joined);
    while (k > 0)
        block_unref(held[--k]);
    return stored;
}

/* An open for reading of `ino`, whose attributes the table holds as of now: if relatime moves its
 * access time, Python moves it (kept in memory, written in batches) and the table and the kernel
 * take the new one. Whether the open goes on (else it was answered with the error). */
static int move_atime(uint64_t ino, fuse_req_t req) {
    pthread_mutex_lock(&S->lock);
    node_t *n = find(ino);
    int due = n != NULL && S_ISREG(n->st.st_mode) && atime_due(&n->st);
    pthread_mutex_unlock(&S->lock);
    if (!due)
        return 1;
    PyGILState_STATE g = gil();
    PyObject *r = call("accessed", "(K)", (unsigned long long)ino);
    long long at = gen_of(r); /* the new atime, or -errno */
    int err = at < 0 ? (int)-at : 0;
    Py_XDECREF(r);
    PyGILState_Release(g);
    if (err) {
        fuse_reply_err(req, err == ENOENT ? ESTALE : err);
        return 0;
    }
    pthread_mutex_lock(&S->lock);
    if ((n = find(ino)) != NULL && at > ns_of(&n->st.st_atim)) {
        n->st.st_atim.tv_sec = at / 1000000000;
        n->st.st_atim.tv_nsec = at % 1000000000;
    }
    pthread_mutex_unlock(&S->lock);
    fuse_lowlevel_notify_inval_inode(S->se, ino, -1, 0); /* its attributes only: a stat shows the new atime */
    return 1;
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    if (S->no_open) { /* from now on the kernel opens, flushes and closes files of this mount alone */
        fuse_reply_err(req, ENOSYS);
        return;
    }
    if ((fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & O_TRUNC) || has_python_handles(ino)) {
        settle_ino(ino);
        open_python(req, ino, fi);
        return;
    }
    long long gen = opens_checked() ? -1 : gen_native();
    if (gen < 0 && (gen = generation(ino, fuse_req_ctx(req)->uid)) < 0) {
        fuse_reply_err(req, (int)-gen);
        return;
    }
    pthread_mutex_lock(&S->lock);
    if (gen > S->seen_gen)
        S->seen_gen = gen;
    node_t *n = find(ino);
    int stale = n == NULL || n->gen != gen || !n->has_pieces;
    pthread_mutex_unlock(&S->lock);
    if (stale) { /* changed since it was read (or never read whole): read it again, one call */
        struct stat st;
        int err = fetch(&st, "getattr", "(K)", (unsigned long long)ino, NULL);
        if (err) {
            /* gone (removed, or replaced by a rename) while the kernel still held its name: ESTALE
             * makes the kernel look the name up again and retry, as a path-based open would */
            fuse_reply_err(req, err == ENOENT ? ESTALE : err);
            return;
        }
    }
    if (S->relatime && !move_atime(ino, req))
        return;
    openfile_t *of = calloc(1, sizeof *of);
    if (of == NULL) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    of->ra = &of->own;
    pthread_mutex_lock(&S->lock);
    n = find(ino);
    if (n == NULL || !S_ISREG(n->st.st_mode)) {
        int err = n != NULL && S_ISDIR(n->st.st_mode) ? EISDIR : n == NULL ? ENOENT : EACCES;
        pthread_mutex_unlock(&S->lock);
        free(of);
        fuse_reply_err(req, err);
        return;
    }
    of->ino = ino;
    of->size = (uint64_t)n->st.st_size;
    of->pieces = pieces_ref(n->pieces);
    /* the kernel's pages of this file stay good while its content is the version they came from */
    fi->keep_cache = n->opened == n->stamp;
    n->opened = n->stamp;
    n->opens++;
    /* and its attributes while they are the version open found (its size bounds reads): changed
     * elsewhere since it was given them, it drops them and asks again (close-to-open for the size too) */
    int drop_attrs = n->given != 0 && n->given != n->stamp;
    if (drop_attrs)
        n->given = 0;
    uint64_t stamp = n->stamp;
    pthread_mutex_unlock(&S->lock);
    if (drop_attrs)
        fuse_lowlevel_notify_inval_inode(S->se, ino, -1, 0);
    if (!fi->keep_cache && !(fi->flags & O_DIRECT) && store_at_open(ino, of, stamp))
        fi->keep_cache = 1;
    fi->fh = (uint64_t)(uintptr_t)of;
    fi->noflush = 1; /* nothing to commit at close */
    if (fuse_reply_open(req, fi) != 0) {
        pieces_unref(of->pieces);
        free(of);
        closed(ino, 0);
    }
}

/* The Python path's read of bytes [off, off+size) of an open file (other copies, repair, errors). */
static void read_python(fuse_req_t req, uint64_t ino, size_t size, off_t off) {
    PyGILState_STATE g = gil();
    PyObject *r = call("read", "(KKn)", (unsigned long long)ino, (unsigned long long)off, (Py_ssize_t)size);
    if (reply_read(req, size, r))
        fuse_reply_err(req, EIO); /* None: this read always answers bytes or an errno */
    Py_XDECREF(r);
    PyGILState_Release(g);
}

/* The first piece ending after `off` (pieces are in file order). */
static size_t first_piece(const pieces_t *p, uint64_t off) {
    size_t lo = 0, hi = p->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (p->p[mid].file_off + p->p[mid].len <= off)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Whether the block a piece lies in is cached, read and long enough (no wait: one being read is not). */
static int block_ready(const piece_t *pc) {
    int ready = 0;
    pthread_mutex_lock(&S->cache_lock);
    for (block_t *b = S->cbuckets[block_hash(pc->chunk, pc->idx)]; b; b = b->next)
        if (b->chunk == pc->chunk && b->idx == pc->idx) {
            ready = !b->loading && !b->failed && b->len >= pc->block_lo + pc->len;
            break;
        }
    pthread_mutex_unlock(&S->cache_lock);
    return ready;
}

/* The bytes of a small file held whole in one plain block, read by one pread of just them from the
 * block file and checked against the file's content hash (storage/rangeread.py's rule: the block's
 * own xxh3 covers the whole block and cannot check a range): a malloc'd buffer, or NULL when they
 * cannot be read or do not match (the whole block is then read and checked the usual way, which
 * reports the damage and reads other copies). */
static uint8_t *read_checked_range(const pieces_t *p) {
    const piece_t *pc = &p->p[0];
    if (pc->block_lo > (uint64_t)INT64_MAX - HEADER_SIZE - pc->len)
        return NULL;
    uint8_t *buf = malloc(pc->len ? (size_t)pc->len : 1);
    if (buf == NULL)
        return NULL;
    size_t got = 0;
    int fd = open(pc->path, O_RDONLY | O_CLOEXEC);
    int ok = fd >= 0 && read_all(fd, buf, (size_t)pc->len, HEADER_SIZE + (size_t)pc->block_lo, &got) == 0 && got == pc->len;
    if (fd >= 0)
        close(fd);
    if (ok) {
        XXH128_canonical_t c;
        XXH128_canonicalFromHash(&c, XXH3_128bits(buf, (size_t)pc->len));
        ok = memcmp(c.digest, p->hash, sizeof p->hash) == 0;
    }
    if (!ok) {
        free(buf);
        return NULL;
    }
    return buf;
}

static void read_open(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, openfile_t *of) {
    if (off < 0) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    if (of->pyfh != 0) {
        if (!read_unflushed(req, ino, of->pyfh, size, off))
            fuse_reply_err(req, EIO);
        return;
    }
    if (has_python_handles(ino) && read_unflushed(req, ino, 0, size, off))
        return;
    uint64_t start = (uint64_t)off, end = start + size;
    if (end > of->size)
        end = of->size;
    if (start >= end) {
        fuse_reply_buf(req, NULL, 0);
        return;
    }
    if (of->pieces == NULL) {
        read_python(req, ino, (size_t)(end - start), off);
        return;
    }
    const pieces_t *p = of->pieces;
    if (S->no_open && p->hashed && start == 0 && end == of->size && p->p[0].file_off == 0 && p->p[0].len == of->size &&
        !block_ready(&p->p[0])) {
        /* with no OPEN, the kernel keeps a small file's pages: a cold one whose block is not here yet
         * is read by its own bytes, its block left on the disk (a random order touches each block for
         * a file or two; a directory's listing still reads its blocks ahead) */
        uint8_t *own = read_checked_range(p);
        if (own != NULL) {
            fuse_reply_buf(req, (const char *)own, (size_t)(end - start));
            free(own);
            return;
        }
    }
    size_t i = first_piece(p, start);
    int big = large_file(of); /* a large file's blocks are read ahead in file order */
    int in_order = i < p->n && read_ahead_file(of, i, start, end);
    /* most small files, and most reads of a big one: one block holds the whole range */
    if (i < p->n && p->p[i].file_off <= start && p->p[i].file_off + p->p[i].len >= end) {
        const piece_t *pc = &p->p[i];
        block_t *b = get_block(pc, 0, big);
        if (b == NULL) {
            read_python(req, ino, (size_t)(end - start), off);
            return;
        }
        fuse_reply_buf(req, (const char *)b->data + pc->block_lo + (start - pc->file_off), (size_t)(end - start));
        if (in_order && b->pooled)
            served(b, (size_t)(end - start));
        block_unref(b);
        return;
    }
    uint8_t *buf = calloc(1, (size_t)(end - start)); /* holes (a sparse file) read as zeros */
    if (buf == NULL) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    for (; i < p->n && p->p[i].file_off < end; i++) {
        const piece_t *pc = &p->p[i];
        uint64_t lo = pc->file_off > start ? pc->file_off : start;
        uint64_t hi = pc->file_off + pc->len < end ? pc->file_off + pc->len : end;
        block_t *b = get_block(pc, 0, big);
        if (b == NULL) {
            free(buf);
            read_python(req, ino, (size_t)(end - start), off);
            return;
        }
        memcpy(buf + (lo - start), b->data + pc->block_lo + (lo - pc->file_off), (size_t)(hi - lo));
        if (in_order && b->pooled)
            served(b, (size_t)(hi - lo));
        block_unref(b);
    }
    fuse_reply_buf(req, (const char *)buf, (size_t)(end - start));
    free(buf);
}

/* Drop the kernel's cached pages of every file the table holds. */
static void drop_all_pages(void) {
    size_t n = 0, cap = 0;
    uint64_t *inos = NULL;
    pthread_mutex_lock(&S->lock);
    for (size_t b = 0; b < NBUCKETS; b++)
        for (node_t *nd = S->buckets[b]; nd; nd = nd->next) {
            if (!S_ISREG(nd->st.st_mode))
                continue;
            if (n == cap) {
                uint64_t *more = realloc(inos, (cap = cap ? 2 * cap : 1024) * sizeof *inos);
                if (more == NULL)
                    break;
                inos = more;
            }
            inos[n++] = nd->ino;
        }
    pthread_mutex_unlock(&S->lock);
    for (size_t i = 0; i < n; i++)
        fuse_lowlevel_notify_inval_inode(S->se, inos[i], 0, 0);
    free(inos);
}

/* With no OPEN (no_open), opens came to need checking (a grant, a read audit set up after the mount
 * started): from now on each READ is checked as an open would be, and the watcher (policy_main) drops
 * the kernel's pages of every file once, so that what it cached before is read, and checked, again.
 * Files it caches after are served from its cache unchecked: the log says to mount again. */
static void policy_came_late(void) {
    if (__atomic_exchange_n(&S->policy_late, 1, __ATOMIC_ACQ_REL))
        return;
    pthread_mutex_lock(&S->ra_lock);
    pthread_cond_broadcast(&S->ra_wake);
    pthread_mutex_unlock(&S->ra_lock);
}

/* Whether the caller of a READ with no OPEN behind it may read `ino` (policy_came_late). 0: answered. */
static int read_allowed(fuse_req_t req, uint64_t ino) {
    if (!policy_checks())
        return 1;
    policy_came_late();
    long long gen = generation(ino, fuse_req_ctx(req)->uid);
    if (gen < 0) {
        fuse_reply_err(req, gen == -ENOENT ? ESTALE : (int)-gen);
        return 0;
    }
    return 1;
}

/* A READ with no open file behind it (no_open): the node's current version as an open file of the
 * caller's, with the node's readahead state. 0: answered with an error. */
static int node_file(fuse_req_t req, uint64_t ino, openfile_t *of) {
    if (!read_allowed(req, ino))
        return 0;
    for (int attempt = 0; attempt < 2; attempt++) {
        pthread_mutex_lock(&S->lock);
        node_t *n = find(ino);
        if (n != NULL && n->has_pieces) {
            memset(of, 0, sizeof *of);
            of->ino = ino;
            of->size = (uint64_t)n->st.st_size;
            of->pieces = pieces_ref(n->pieces);
            if (n->ra_pieces != n->pieces) { /* a new version: its readers start afresh */
                __atomic_store_n(&n->ra.next_off, 0, __ATOMIC_RELAXED);
                __atomic_store_n(&n->ra.ra_upto, 0, __ATOMIC_RELAXED);
                n->ra_pieces = n->pieces;
            }
            of->ra = &n->ra;
            pthread_mutex_unlock(&S->lock);
            return 1;
        }
        pthread_mutex_unlock(&S->lock);
        struct stat st;
        int err = attempt == 0 ? fetch(&st, "getattr", "(K)", (unsigned long long)ino, NULL) : EIO;
        if (err) {
            fuse_reply_err(req, err == ENOENT ? ESTALE : err);
            return 0;
        }
    }
    return 0;
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    openfile_t *of = (openfile_t *)(uintptr_t)fi->fh, local;
    if (of != NULL) {
        read_open(req, ino, size, off, of);
        return;
    }
    if (!node_file(req, ino, &local))
        return;
    read_open(req, ino, size, off, &local);
    pieces_unref(local.pieces);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    openfile_t *of = (openfile_t *)(uintptr_t)fi->fh;
    if (of != NULL && of->pyfh != 0) {
        release_python(req, ino, of);
        return;
    }
    if (of != NULL) {
        pieces_unref(of->pieces);
        free(of);
    }
    closed(ino, 0);
    fuse_reply_err(req, 0);
}

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    int err = relist(ino); /* a listing is always read fresh, as on the Python path */
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    opendir_t *od = calloc(1, sizeof *od);
    if (od == NULL) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    pthread_mutex_lock(&S->lock);
    node_t *d = find(ino);
    if (d != NULL && !S_ISDIR(d->st.st_mode) && d->gen >= 0)
        err = ENOTDIR;
    else if (d != NULL && (od->ents = calloc(d->nkids + 1, sizeof(dent_t))) != NULL) {
        for (size_t i = 0; i < d->nkids; i++) {
            if ((od->ents[od->n].name = strdup(d->kids[i].name)) == NULL)
                break;
            od->ents[od->n].mode = d->kids[i].mode;
            od->ents[od->n++].ino = d->kids[i].ino;
        }
    } else {
        err = ENOMEM;
    }
    pthread_mutex_unlock(&S->lock);
    if (err) {
        free_kids(od->ents, od->n);
        free(od);
        fuse_reply_err(req, err);
        return;
    }
    fi->fh = (uint64_t)(uintptr_t)od;
    if (fuse_reply_open(req, fi) != 0) {
        free_kids(od->ents, od->n);
        free(od);
    }
}

/* READDIR and READDIRPLUS: entries from position `off` of the listing taken at OPENDIR ("." and
 * ".." first); under plus every entry carries its attributes, so the kernel caches the entry and a
 * stat of it needs no LOOKUP. */
static void readdir_common(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi, int plus) {
    opendir_t *od = (opendir_t *)(uintptr_t)fi->fh;
    char *buf = malloc(size ? size : 1);
    if (buf == NULL) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    size_t pos = 0;
    for (size_t i = off < 0 ? 0 : (size_t)off; i < od->n + 2; i++) {
        const char *name = i == 0 ? "." : i == 1 ? ".." : od->ents[i - 2].name;
        struct fuse_entry_param e;
        memset(&e, 0, sizeof e);
        e.attr.st_mode = S_IFDIR;
        e.attr.st_ino = i == 0 ? ino : 0;
        pthread_mutex_lock(&S->lock);
        node_t *n = i >= 2 ? find(od->ents[i - 2].ino) : NULL;
        if (n != NULL) {
            e.attr = n->st;
            e.ino = n->st.st_ino;
            e.attr_timeout = S->attr_timeout;
            e.entry_timeout = S->entry_timeout;
        } else if (i >= 2) { /* left the table: the name and type only (ino 0: no entry for the kernel) */
            e.attr.st_ino = od->ents[i - 2].ino;
            e.attr.st_mode = od->ents[i - 2].mode;
        }
        size_t want = plus ? fuse_add_direntry_plus(req, buf + pos, size - pos, name, &e, (off_t)(i + 1))
                           : fuse_add_direntry(req, buf + pos, size - pos, name, &e.attr, (off_t)(i + 1));
        if (want <= size - pos && plus && n != NULL) {
            n->nlookup++; /* the kernel counts an entry of READDIRPLUS as a lookup */
            n->given = n->stamp;
        }
        pthread_mutex_unlock(&S->lock);
        if (want > size - pos)
            break; /* the kernel's buffer is full: it asks again from this entry */
        pos += want;
    }
    fuse_reply_buf(req, buf, pos);
    free(buf);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    readdir_common(req, ino, size, off, fi, 0);
}

static void op_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    readdir_common(req, ino, size, off, fi, 1);
}

static void op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)ino;
    opendir_t *od = (opendir_t *)(uintptr_t)fi->fh;
    if (od != NULL) {
        free_kids(od->ents, od->n);
        free(od);
    }
    fuse_reply_err(req, 0);
}

/* provider.<method>(ino[, name]) -> bytes, replied as a buffer or (size given) an xattr. */
static void reply_bytes(fuse_req_t req, const char *method, fuse_ino_t ino, const char *name, int xattr, size_t size) {
    PyGILState_STATE g = gil();
    PyObject *r = name ? call(method, "(Ky)", (unsigned long long)ino, name) : call(method, "(K)", (unsigned long long)ino);
    int err = err_of(r);
    if (!err && !PyBytes_Check(r))
        err = EIO;
    if (err) {
        fuse_reply_err(req, err);
    } else {
        size_t n = (size_t)PyBytes_GET_SIZE(r);
        if (xattr && size == 0)
            fuse_reply_xattr(req, n);
        else if (xattr && n > size)
            fuse_reply_err(req, ERANGE);
        else if (!xattr)
            fuse_reply_readlink(req, PyBytes_AS_STRING(r)); /* bytes objects end with a NUL */
        else
            fuse_reply_buf(req, PyBytes_AS_STRING(r), n);
    }
    Py_XDECREF(r);
    PyGILState_Release(g);
}

static void op_readlink(fuse_req_t req, fuse_ino_t ino) { reply_bytes(req, "readlink", ino, NULL, 0, 0); }

static void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size) {
    if (strcmp(name, "security.capability") == 0) { /* asked before buffered writes; never stored (setxattr refuses it) */
        fuse_reply_err(req, ENODATA);
        return;
    }
    reply_bytes(req, "getxattr", ino, name, 1, size);
}

static void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) { reply_bytes(req, "listxattr", ino, NULL, 1, size); }

static void op_statfs(fuse_req_t req, fuse_ino_t ino) {
    (void)ino;
    PyGILState_STATE g = gil();
    PyObject *r = call("statfs", "()");
    int err = err_of(r);
    struct statvfs sv;
    memset(&sv, 0, sizeof sv);
    unsigned long long bsize, frsize, blocks, bfree, bavail, files, ffree, favail, namemax;
    if (!err && !PyArg_ParseTuple(r, "KKKKKKKKK", &bsize, &frsize, &blocks, &bfree, &bavail, &files, &ffree, &favail,
                                  &namemax)) {
        PyErr_WriteUnraisable(S->provider);
        err = EIO;
    }
    if (err) {
        fuse_reply_err(req, err);
    } else {
        sv.f_bsize = bsize;
        sv.f_frsize = frsize;
        sv.f_blocks = blocks;
        sv.f_bfree = bfree;
        sv.f_bavail = bavail;
        sv.f_files = files;
        sv.f_ffree = ffree;
        sv.f_favail = favail;
        sv.f_namemax = namemax;
        fuse_reply_statfs(req, &sv);
    }
    Py_XDECREF(r);
    PyGILState_Release(g);
}

/* -- forwarded operations: every change, through the Python operations ------------------------------
 * Each provider method takes the caller (uid, gid, pid) first and returns (gen, (ino, ...)): the
 * inodes the change touched, which the table forgets, and a generation to note (-1: none); for a call
 * that makes an entry, (gen, attrs, pieces) of it, its directory forgotten; or -errno. The kernel
 * updates its own caches for the change it asked for. */

/* Reply to a forwarded change (GIL held on entry, released here). */
static void reply_change(fuse_req_t req, PyObject *r, PyGILState_STATE g) {
    int err = took_change(r);
    Py_XDECREF(r);
    PyGILState_Release(g);
    fuse_reply_err(req, err);
}

/* A forwarded call's (gen, attrs, pieces) into the table (GIL held); 0 or an errno. `entry`: the
 * kernel gets a reference to it, made in directory `parent`, which is made stale (its mtime moved). */
static int took_node(PyObject *r, struct stat *st, int entry, uint64_t parent) {
    int err = err_of(r);
    if (err)
        return err;
    long long gen;
    PyObject *attrs, *pieces;
    late_err_t bad = {NULL, NULL, NULL};
    pthread_mutex_lock(&S->lock);
    if (!PyArg_ParseTuple(r, "LOO", &gen, &attrs, &pieces) || install(attrs, pieces, gen, st) != 0) {
        err_keep(&bad);
        err = EIO;
    } else if (entry) {
        referenced(st->st_ino);
        stale(parent);
    }
    pthread_mutex_unlock(&S->lock);
    err_report(&bad);
    return err;
}

/* Reply with the entry a forwarded call made in `parent` (GIL held on entry, released here). */
static void reply_made(fuse_req_t req, uint64_t parent, PyObject *r, PyGILState_STATE g) {
    struct stat st;
    int err = took_node(r, &st, 1, parent);
    Py_XDECREF(r);
    PyGILState_Release(g);
    if (err)
        fuse_reply_err(req, err);
    else
        reply_entry(req, &st);
}

static void op_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev) {
    PyGILState_STATE g = gil();
    reply_made(req, parent, call("mknod", "(" CTX_FMT "KyKK)", CTX(req), (unsigned long long)parent, name,
                         (unsigned long long)mode, (unsigned long long)rdev), g);
}

static void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode) {
    PyGILState_STATE g = gil();
    reply_made(req, parent, call("mkdir", "(" CTX_FMT "KyK)", CTX(req), (unsigned long long)parent, name, (unsigned long long)mode), g);
}

static void op_symlink(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name) {
    PyGILState_STATE g = gil();
    reply_made(req, parent, call("symlink", "(" CTX_FMT "yKy)", CTX(req), link, (unsigned long long)parent, name), g);
}

static void op_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char *newname) {
    settle_ino(ino);
    PyGILState_STATE g = gil();
    reply_made(req, newparent, call("link", "(" CTX_FMT "KKy)", CTX(req), (unsigned long long)ino, (unsigned long long)newparent, newname), g);
}

static void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name) {
    PyGILState_STATE g = gil();
    reply_change(req, call("unlink", "(" CTX_FMT "Ky)", CTX(req), (unsigned long long)parent, name), g);
}

static void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name) {
    PyGILState_STATE g = gil();
    reply_change(req, call("rmdir", "(" CTX_FMT "Ky)", CTX(req), (unsigned long long)parent, name), g);
}

static void op_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent, const char *newname,
                      unsigned int flags) {
    PyGILState_STATE g = gil();
    reply_change(req, call("rename", "(" CTX_FMT "KyKyI)", CTX(req), (unsigned long long)parent, name,
                           (unsigned long long)newparent, newname, flags), g);
}

/* The Python handle of an open file (0: none, or a native one). */
static uint64_t python_fh(struct fuse_file_info *fi) {
    return fi != NULL && fi->fh ? ((openfile_t *)(uintptr_t)fi->fh)->pyfh : 0;
}

#define TIME_NOW (-1LL)  /* setattr's times: set to now */
#define TIME_OMIT (-2LL) /* left as they are */

static long long time_arg(int to_set, int bit, int now_bit, const struct timespec *ts) {
    if (to_set & now_bit)
        return TIME_NOW;
    if (to_set & bit)
        return (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec;
    return TIME_OMIT;
}

/* SETATTR (chmod, chown, utimens, truncate): provider.setattr(ctx, ino, to_set, mode, uid, gid, size,
 * atime_ns, mtime_ns, fh) -> (gen, attrs, pieces). */
static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi) {
    long long at = time_arg(to_set, FUSE_SET_ATTR_ATIME, FUSE_SET_ATTR_ATIME_NOW, &attr->st_atim);
    long long mt = time_arg(to_set, FUSE_SET_ATTR_MTIME, FUSE_SET_ATTR_MTIME_NOW, &attr->st_mtim);
    settle_ino(ino);
    PyGILState_STATE g = gil();
    PyObject *r = call("setattr", "(" CTX_FMT "KiKKKLLLK)", CTX(req), (unsigned long long)ino, to_set,
                       (unsigned long long)attr->st_mode, (unsigned long long)attr->st_uid, (unsigned long long)attr->st_gid,
                       (long long)attr->st_size, at, mt, (unsigned long long)python_fh(fi));
    struct stat st;
    int err = took_node(r, &st, 0, 0);
    Py_XDECREF(r);
    PyGILState_Release(g);
    if (!err)
        gave_attrs(ino);
    reply_attr(req, err, &st);
}

/* CREATE: provider.create(ctx, parent, name, mode, flags) -> ((gen, attrs, pieces), fh, keep_cache). */
static void op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_file_info *fi) {
    PyGILState_STATE g = gil();
    PyObject *r = call("create", "(" CTX_FMT "KyKi)", CTX(req), (unsigned long long)parent, name, (unsigned long long)mode,
                       fi->flags);
    PyObject *made = NULL;
    unsigned long long fh = 0;
    int keep = 0, err = err_of(r);
    struct stat st;
    if (!err && !PyArg_ParseTuple(r, "OKp", &made, &fh, &keep)) {
        PyErr_WriteUnraisable(S->provider);
        err = EIO;
    }
    if (!err)
        err = took_node(made, &st, 1, parent);
    Py_XDECREF(r);
    PyGILState_Release(g);
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    openfile_t *of = python_file(st.st_ino, fh);
    if (of == NULL) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    opened_python(st.st_ino);
    struct fuse_entry_param e;
    memset(&e, 0, sizeof e);
    e.ino = st.st_ino;
    e.attr = st;
    e.attr_timeout = S->attr_timeout;
    e.entry_timeout = S->entry_timeout;
    fi->fh = (uint64_t)(uintptr_t)of;
    fi->keep_cache = keep;
    fi->direct_io = write_only(fi);
    if (fuse_reply_create(req, &e, fi) != 0)
        release_python(NULL, st.st_ino, of);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
    uint64_t fh = python_fh(fi);
    if (fh == 0) {
        fuse_reply_err(req, EBADF);
        return;
    }
    openfile_t *of = (openfile_t *)(uintptr_t)fi->fh;
    if (off >= 0 && write_gathered(req, of, buf, size, (uint64_t)off))
        return;
    settle_ino(ino); /* another handle's gathered writes go first */
    PyGILState_STATE g = gil();
    PyObject *r = call("fh_write", "(KKy#L)", (unsigned long long)ino, (unsigned long long)fh, buf, (Py_ssize_t)size,
                       (long long)off);
    long long n = gen_of(r); /* bytes written, or -errno */
    if (n > 0) { /* (the GIL orders the handle's WRITEs that come here) */
        of->wrun = (uint64_t)off == of->wnext ? of->wrun + (uint64_t)n : (uint64_t)n;
        of->wnext = (uint64_t)off + (uint64_t)n;
    }
    Py_XDECREF(r);
    PyGILState_Release(g);
    if (n < 0)
        stop_gather(of);
    if (n < 0)
        fuse_reply_err(req, (int)-n);
    else
        fuse_reply_write(req, (size_t)n);
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    if (S->no_open && fi->fh == 0) { /* the kernel sends no FLUSH again */
        fuse_reply_err(req, ENOSYS);
        return;
    }
    uint64_t fh = python_fh(fi);
    if (fh == 0) { /* a native handle: nothing to commit */
        fuse_reply_err(req, 0);
        return;
    }
    settle_ino(ino);
    PyGILState_STATE g = gil();
    PyObject *r = call("fh_flush", "(KK)", (unsigned long long)ino, (unsigned long long)fh);
    int err = took_change(r);
    Py_XDECREF(r);
    PyGILState_Release(g);
    if (err)
        stop_gather((openfile_t *)(uintptr_t)fi->fh);
    fuse_reply_err(req, err);
}

/* FSYNC of any handle (a native one: everything closed before is made durable, as on the Python session). */
static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi) {
    settle_ino(ino);
    PyGILState_STATE g = gil();
    PyObject *r = call("fh_fsync", "(KKi)", (unsigned long long)ino, (unsigned long long)python_fh(fi), datasync);
    int err = took_change(r);
    Py_XDECREF(r);
    PyGILState_Release(g);
    if (err && python_fh(fi) != 0)
        stop_gather((openfile_t *)(uintptr_t)fi->fh);
    fuse_reply_err(req, err);
}

static void op_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi) {
    (void)ino;
    (void)datasync;
    (void)fi;
    PyGILState_STATE g = gil();
    reply_change(req, call("fsyncdir", "()"), g);
}

static void op_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value, size_t size, int flags) {
    PyGILState_STATE g = gil();
    reply_change(req, call("setxattr", "(" CTX_FMT "Kyy#i)", CTX(req), (unsigned long long)ino, name, value, (Py_ssize_t)size,
                           flags), g);
}

static void op_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name) {
    PyGILState_STATE g = gil();
    reply_change(req, call("removexattr", "(" CTX_FMT "Ky)", CTX(req), (unsigned long long)ino, name), g);
}

TIMED(K_LOOKUP, lookup, (fuse_req_t req, fuse_ino_t parent, const char *name), (req, parent, name))
TIMED(K_GETATTR, getattr, (fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi), (req, ino, fi))
TIMED(K_OPEN, open, (fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi), (req, ino, fi))
TIMED(K_READ, read, (fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi),
      (req, ino, size, off, fi))
TIMED(K_RELEASE, release, (fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi), (req, ino, fi))
TIMED(K_OPENDIR, opendir, (fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi), (req, ino, fi))
TIMED(K_READDIR, readdir, (fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi),
      (req, ino, size, off, fi))
TIMED(K_READDIRPLUS, readdirplus, (fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi),
      (req, ino, size, off, fi))
TIMED(K_RELEASEDIR, releasedir, (fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi), (req, ino, fi))
TIMED(K_READLINK, readlink, (fuse_req_t req, fuse_ino_t ino), (req, ino))
TIMED(K_GETXATTR, getxattr, (fuse_req_t req, fuse_ino_t ino, const char *name, size_t size), (req, ino, name, size))
TIMED(K_LISTXATTR, listxattr, (fuse_req_t req, fuse_ino_t ino, size_t size), (req, ino, size))
TIMED(K_STATFS, statfs, (fuse_req_t req, fuse_ino_t ino), (req, ino))
TIMED(K_MKNOD, mknod, (fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev),
      (req, parent, name, mode, rdev))
TIMED(K_MKDIR, mkdir, (fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode), (req, parent, name, mode))
TIMED(K_SYMLINK, symlink, (fuse_req_t req, const char *link, fuse_ino_t parent, const char *name), (req, link, parent, name))
TIMED(K_LINK, link, (fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char *newname), (req, ino, newparent, newname))
TIMED(K_UNLINK, unlink, (fuse_req_t req, fuse_ino_t parent, const char *name), (req, parent, name))
TIMED(K_RMDIR, rmdir, (fuse_req_t req, fuse_ino_t parent, const char *name), (req, parent, name))
TIMED(K_RENAME, rename,
      (fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent, const char *newname, unsigned int flags),
      (req, parent, name, newparent, newname, flags))
TIMED(K_SETATTR, setattr, (fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi),
      (req, ino, attr, to_set, fi))
TIMED(K_CREATE, create, (fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_file_info *fi),
      (req, parent, name, mode, fi))
TIMED(K_WRITE, write, (fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off, struct fuse_file_info *fi),
      (req, ino, buf, size, off, fi))
TIMED(K_FLUSH, flush, (fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi), (req, ino, fi))
TIMED(K_FSYNC, fsync, (fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi), (req, ino, datasync, fi))
TIMED(K_FSYNCDIR, fsyncdir, (fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi), (req, ino, datasync, fi))
TIMED(K_SETXATTR, setxattr, (fuse_req_t req, fuse_ino_t ino, const char *name, const char *value, size_t size, int flags),
      (req, ino, name, value, size, flags))
TIMED(K_REMOVEXATTR, removexattr, (fuse_req_t req, fuse_ino_t ino, const char *name), (req, ino, name))

static const struct fuse_lowlevel_ops ops = {
    .init = op_init,
    .lookup = timed_lookup,
    .forget = op_forget,
    .forget_multi = op_forget_multi,
    .getattr = timed_getattr,
    .open = timed_open,
    .read = timed_read,
    .release = timed_release,
    .opendir = timed_opendir,
    .readdir = timed_readdir,
    .readdirplus = timed_readdirplus,
    .releasedir = timed_releasedir,
    .readlink = timed_readlink,
    .getxattr = timed_getxattr,
    .listxattr = timed_listxattr,
    .statfs = timed_statfs,
    .mknod = timed_mknod,
    .mkdir = timed_mkdir,
    .symlink = timed_symlink,
    .link = timed_link,
    .unlink = timed_unlink,
    .rmdir = timed_rmdir,
    .rename = timed_rename,
    .setattr = timed_setattr,
    .create = timed_create,
    .write = timed_write,
    .flush = timed_flush,
    .fsync = timed_fsync,
    .fsyncdir = timed_fsyncdir,
    .setxattr = timed_setxattr,
    .removexattr = timed_removexattr,
};

/* -- serve() ------------------------------------------------------------------------------------- */

static void free_session(void) {
    for (size_t i = 0; i < NBUCKETS; i++) {
        node_t *n = S->buckets[i];
        while (n) {
            node_t *next = n->next;
            free_node(n);
            n = next;
        }
    }
    while (S->lru_head)
        evict(S->lru_head);
    while (S->pool_n > 0)
        free(S->pool[--S->pool_n]);
    gen_conn_free(pthread_getspecific(S->gen_key)); /* this thread's; the workers' went with them */
    pthread_key_delete(S->gen_key);
    if (S->shm_fd >= 0)
        close(S->shm_fd);
    pthread_mutex_destroy(&S->memo_lock);
    free(S->gen_path);
    free(S->gen_sql);
    forget_block_files();
    pthread_mutex_destroy(&S->ra_lock);
    pthread_mutex_destroy(&S->store_lock);
    pthread_cond_destroy(&S->listed);
    pthread_cond_destroy(&S->ra_wake);
    pthread_mutex_destroy(&S->policy_lock);
    pthread_mutex_destroy(&S->lock);
    pthread_mutex_destroy(&S->cache_lock);
    pthread_mutex_destroy(&S->pool_lock);
    while (S->gathers != NULL) { /* handles never released (the daemon stopped): dropped, as Python drops theirs */
        gather_t *g = S->gathers;
        S->gathers = g->next;
        gather_unref(g);
    }
    pthread_mutex_destroy(&S->gathers_lock);
    pthread_cond_destroy(&S->loaded);
    Py_XDECREF(S->provider);
    free(S->volume);
    free(S);
    S = NULL;
}

static PyObject *py_serve(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *provider, *argl;
    const char *mountpoint, *volume;
    double entry_t, attr_t, neg_t, ttl;
    Py_ssize_t cache_bytes, block_limit;
    long long max_file;
    int threads;
    if (!PyArg_ParseTuple(args, "OsOsddddnniL", &provider, &mountpoint, &argl, &volume, &entry_t, &attr_t, &neg_t, &ttl,
                          &cache_bytes, &block_limit, &threads, &max_file))
        return NULL;
    if (S != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a native session is already serving in this process");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(argl, "args must be a list of str");
    if (seq == NULL)
        return NULL;
    Py_ssize_t argc = PySequence_Fast_GET_SIZE(seq);
    char **argv = calloc((size_t)argc + 1, sizeof(char *));
    S = calloc(1, sizeof *S);
    if (argv == NULL || S == NULL) {
        free(argv);
        free(S);
        S = NULL;
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < argc; i++) {
        const char *a = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(seq, i));
        argv[i] = a ? strdup(a) : NULL;
        if (argv[i] == NULL) {
            for (Py_ssize_t j = 0; j < i; j++)
                free(argv[j]);
            free(argv);
            free(S);
            S = NULL;
            Py_DECREF(seq);
            return PyErr_Occurred() ? NULL : PyErr_NoMemory();
        }
    }
    Py_DECREF(seq);
    S->provider = Py_NewRef(provider);
    S->volume = strdup(volume);
    S->entry_timeout = entry_t;
    S->attr_timeout = attr_t;
    S->negative_timeout = neg_t;
    S->meta_ttl = ttl;
    S->cache_cap = cache_bytes > 0 ? (size_t)cache_bytes : 0;
    S->block_limit = block_limit > 0 ? (size_t)block_limit : 0;
    S->seen_gen = -1;
    S->opens_checked = 1;
    S->policy_at = -1e9;
    pthread_mutex_init(&S->policy_lock, NULL);
    pthread_mutex_init(&S->ra_lock, NULL);
    pthread_mutex_init(&S->store_lock, NULL);
    pthread_mutex_init(&S->pool_lock, NULL);
    pthread_mutex_init(&S->gathers_lock, NULL);
    S->max_file = max_file > 0 ? (uint64_t)max_file : 0;
    S->pool_cap = S->block_limit ? (S->block_limit + HEADER_SIZE + PAGE_BYTES - 1) / PAGE_BYTES * PAGE_BYTES : 0;
    pthread_cond_init(&S->listed, NULL);
    pthread_cond_init(&S->ra_wake, NULL);
    pthread_key_create(&S->gen_key, gen_conn_free);
    pthread_mutex_init(&S->memo_lock, NULL);
    S->shm_fd = -1;
    pthread_mutex_init(&S->lock, NULL);
    pthread_mutex_init(&S->cache_lock, NULL);
    pthread_cond_init(&S->loaded, NULL);
    int rc = -1;
    struct fuse_args fargs = FUSE_ARGS_INIT((int)argc, argv);
    Py_BEGIN_ALLOW_THREADS
    struct fuse_session *se = fuse_session_new(&fargs, &ops, sizeof ops, NULL);
    if (se != NULL) {
        S->se = se;
        if (fuse_set_signal_handlers(se) == 0) {
            if (fuse_session_mount(se, mountpoint) == 0) {
                struct fuse_loop_config *cfg = fuse_loop_cfg_create();
                pthread_t ra[RA_THREADS];
                int ra_up = 0;
                while (ra_up < RA_THREADS && pthread_create(&ra[ra_up], NULL, readahead_main, NULL) == 0)
                    ra_up++;
                pthread_t watch;
                int watching = pthread_create(&watch, NULL, policy_main, NULL) == 0;
                if (cfg != NULL) {
                    fuse_loop_cfg_set_max_threads(cfg, (unsigned)(threads > 0 ? threads : 1));
                    fuse_loop_cfg_set_idle_threads(cfg, (unsigned)(threads > 0 ? threads : 1));
                    rc = fuse_session_loop_mt(se, cfg);
                    fuse_loop_cfg_destroy(cfg);
                }
                pthread_mutex_lock(&S->ra_lock);
                S->ra_stop = 1;
                pthread_cond_broadcast(&S->ra_wake);
                pthread_mutex_unlock(&S->ra_lock);
                while (ra_up > 0)
                    pthread_join(ra[--ra_up], NULL);
                if (watching)
                    pthread_join(watch, NULL);
                fuse_session_unmount(se);
            }
            fuse_remove_signal_handlers(se);
        }
        fuse_session_destroy(se);
    }
    Py_END_ALLOW_THREADS
    fuse_opt_free_args(&fargs);
    for (Py_ssize_t i = 0; i < argc; i++)
        free(argv[i]);
    free(argv);
    free_session();
    return PyLong_FromLong(rc);
}

enum node_call { NODE_IS_OPEN, NODE_HIDE };

/* The provider's calls about one inode of the serving session (argument: the inode number). */
static PyObject *node_call(PyObject *arg, enum node_call what) {
    unsigned long long ino = PyLong_AsUnsignedLongLong(arg);
    if (ino == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    int open = 0;
    if (S != NULL) {
        pthread_mutex_lock(&S->lock);
        node_t *n = find(ino);
        open = n != NULL && n->opens > 0;
        if (open && what == NODE_HIDE)
            n->hidden = 1;
        pthread_mutex_unlock(&S->lock);
    }
    if (what == NODE_IS_OPEN)
        return PyBool_FromLong(open);
    Py_RETURN_NONE;
}

/* is_open(ino): whether the serving session has `ino` open (the provider hides such a file when its
 * last name goes, as libfuse's high-level API does). */
static PyObject *py_is_open(PyObject *self, PyObject *arg) {
    (void)self;
    return node_call(arg, NODE_IS_OPEN);
}

/* hidden(ino): the provider renamed open file `ino` to a hidden name; unlink it at its last close. */
static PyObject *py_hidden(PyObject *self, PyObject *arg) {
    (void)self;
    return node_call(arg, NODE_HIDE);
}

/* op_stats_enable(bounds): count every request's handling time into histograms with these bounds
 * (ascending seconds) and its error answers, from now on (before serve). */
static PyObject *py_op_stats_enable(PyObject *self, PyObject *arg) {
    (void)self;
    PyObject *seq = PySequence_Fast(arg, "bounds must be a sequence of seconds");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > OP_MAX_BOUNDS) {
        Py_DECREF(seq);
        return PyErr_Format(PyExc_ValueError, "at most %d bounds", OP_MAX_BOUNDS);
    }
    double b[OP_MAX_BOUNDS];
    for (Py_ssize_t i = 0; i < n; i++) {
        b[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i));
        if (b[i] == -1.0 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
        if (i > 0 && !(b[i] > b[i - 1])) {
            Py_DECREF(seq);
            return PyErr_Format(PyExc_ValueError, "bounds must ascend");
        }
    }
    Py_DECREF(seq);
    memcpy(op_bounds, b, sizeof(double) * (size_t)n);
    op_nbounds = (int)n;
    memset(opstats, 0, sizeof opstats);
    op_counting = 1;
    Py_RETURN_NONE;
}

/* op_stats() -> {op: (buckets, seconds, errors)} for every request type counted at least once. */
static PyObject *py_op_stats(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    PyObject *out = PyDict_New();
    for (int k = 0; out != NULL && k < K_OPS; k++) {
        uint64_t total = 0;
        PyObject *buckets = PyTuple_New(op_nbounds + 1);
        if (buckets == NULL) {
            Py_CLEAR(out);
            break;
        }
        for (int i = 0; i <= op_nbounds; i++) {
            uint64_t v = __atomic_load_n(&opstats[k].buckets[i], __ATOMIC_RELAXED);
            total += v;
            PyTuple_SET_ITEM(buckets, i, PyLong_FromUnsignedLongLong(v));
        }
        PyObject *row = total ? Py_BuildValue("(NdK)", buckets,
                                              (double)__atomic_load_n(&opstats[k].sum_ns, __ATOMIC_RELAXED) / 1e9,
                                              (unsigned long long)__atomic_load_n(&opstats[k].errors, __ATOMIC_RELAXED))
                              : NULL;
        if (!total) {
            Py_DECREF(buckets);
            continue;
        }
        if (row == NULL || PyDict_SetItemString(out, op_names[k], row) != 0)
            Py_CLEAR(out);
        Py_XDECREF(row);
    }
    return out;
}

static PyMethodDef methods[] = {
    {"op_stats_enable", py_op_stats_enable, METH_O,
     "op_stats_enable(bounds): count each request type's handling time (histogram bounds in seconds) and errors."},
    {"op_stats", py_op_stats, METH_NOARGS, "op_stats() -> {op: (buckets, seconds, errors)} of the request types counted."},
    {"is_open", py_is_open, METH_O, "is_open(ino): whether the serving session has the file open."},
    {"hidden", py_hidden, METH_O, "hidden(ino): an open file renamed to a hidden name, unlinked at its last close."},
    {"serve", py_serve, METH_VARARGS,
     "serve(provider, mountpoint, args, volume, entry_timeout, attr_timeout, negative_timeout, meta_ttl, cache_bytes, "
     "block_limit, threads, max_file_size): mount and serve a low-level FUSE session until unmounted; libfuse's code."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "balefs._fusenative", "The native FUSE session.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fusenative(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "MAX_READ", MAX_READ) != 0)
        Py_CLEAR(m);
    return m;
}
