/* The on-node block format of balefs/storage/codec.py, shared by the native block engine
 * (blockengine.c) and the native FUSE session (fusesession.c): header parsing and checks, the
 * seeded xxh3, lz4 decoding, in the codec's order and with its messages. */
#ifndef BALEFS_BLOCKCODEC_H
#define BALEFS_BLOCKCODEC_H

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <lz4frame.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

/* Bulk hashes (whole blocks, a file's bytes as they are written) go through libxxhash's
 * runtime-dispatched entry points: the inline code above is compiled for baseline x86-64 (SSE2),
 * while the library picks AVX-512 or AVX2 where the CPU has them (4 MiB blocks out of memory:
 * 7.6 GB/s against 5.6 here). Short inputs (headers, seeds) stay inline. */
#if defined(__x86_64__) && __has_include(<xxh_x86dispatch.h>)
XXH64_hash_t XXH3_64bits_withSeed_dispatch(const void *input, size_t len, XXH64_hash_t seed);
XXH_errorcode XXH3_64bits_update_dispatch(XXH3_state_t *state, const void *input, size_t len);
XXH_errorcode XXH3_128bits_update_dispatch(XXH3_state_t *state, const void *input, size_t len);
#define bulk_xxh3_seeded XXH3_64bits_withSeed_dispatch
#define bulk_xxh3_64_update XXH3_64bits_update_dispatch
#define bulk_xxh3_128_update XXH3_128bits_update_dispatch
#else
#define bulk_xxh3_seeded XXH3_64bits_withSeed
#define bulk_xxh3_64_update XXH3_64bits_update
#define bulk_xxh3_128_update XXH3_128bits_update
#endif

#define HEADER_SIZE 32
#define VERSION 2
#define UNSEEDED 1
#define FLAG_LZ4 0x01
#define FLAG_GROWING 0x02
#define FLAG_AESGCM 0x04 /* a sealed payload (an encrypted volume's): the Python codec's to open */
#define MSG_LEN 160

typedef struct {
    uint8_t version, flags;
    uint16_t key_no; /* a sealed block's data key number */
    uint32_t raw_len, stored_len;
    uint64_t digest;
} header_t;

static inline uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32; }

/* Parse and check a header, sealed or not; 0, or -1 with msg set (the codec's messages, in its order). */
static inline int parse_any_header(const uint8_t *h, size_t have, header_t *out, char *msg) {
    if (have < HEADER_SIZE) {
        snprintf(msg, MSG_LEN, "truncated header (%zu bytes)", have);
        return -1;
    }
    if (memcmp(h, "BALE", 4) != 0) {
        snprintf(msg, MSG_LEN, "bad magic %02x%02x%02x%02x", h[0], h[1], h[2], h[3]);
        return -1;
    }
    if (get64(h + 24) != XXH3_64bits(h, 24)) {
        snprintf(msg, MSG_LEN, "header checksum mismatch");
        return -1;
    }
    out->version = h[4];
    out->flags = h[5];
    out->raw_len = get32(h + 8);
    out->stored_len = get32(h + 12);
    out->digest = get64(h + 16);
    if (out->version != VERSION && out->version != UNSEEDED) {
        snprintf(msg, MSG_LEN, "unsupported block format version %u", out->version);
        return -1;
    }
    out->key_no = (uint16_t)(h[6] | h[7] << 8);
    return 0;
}

/* parse_any_header, refusing a sealed block: code that holds no key reads plain blocks only. */
static inline int parse_header(const uint8_t *h, size_t have, header_t *out, char *msg) {
    if (parse_any_header(h, have, out, msg))
        return -1;
    if (out->flags & FLAG_AESGCM) {
        snprintf(msg, MSG_LEN, "an encrypted block (sealed payload): not read by the block engine");
        return -1;
    }
    return 0;
}

/* The payload's length as the codec sees it: `avail` bytes follow the header; 0 or -1 with msg. */
static inline int payload_length(const header_t *hd, size_t avail, size_t *len, char *msg) {
    if ((hd->flags & FLAG_GROWING) && avail > hd->stored_len)
        avail = hd->stored_len; /* bytes a later header will name */
    if (avail != hd->stored_len) {
        snprintf(msg, MSG_LEN, "truncated payload (%zu of %u bytes)", avail, hd->stored_len);
        return -1;
    }
    *len = avail;
    return 0;
}

/* The length decode will produce, or -1 with msg: an lz4 block may not claim more than `limit`. */
static inline int output_length(const header_t *hd, size_t limit, size_t *len, char *msg) {
    if (hd->flags & FLAG_LZ4) {
        if (hd->raw_len > limit) {
            snprintf(msg, MSG_LEN, "raw length %u is more than the %zu bytes a block can hold", hd->raw_len, limit);
            return -1;
        }
    } else if (hd->raw_len != hd->stored_len) {
        snprintf(msg, MSG_LEN, "raw length %u != %u", hd->stored_len, hd->raw_len);
        return -1;
    }
    *len = hd->raw_len;
    return 0;
}

static inline uint64_t block_seed(const char *volume, long long chunk, long long idx) {
    char name[512];
    int n = snprintf(name, sizeof name, "%s/%lld/%lld", volume, chunk, idx);
    if (n < 0)
        n = 0;
    if ((size_t)n >= sizeof name) { /* a volume name longer than any uuid: hash it in pieces */
        XXH3_state_t st;
        char tail[64];
        int m = snprintf(tail, sizeof tail, "/%lld/%lld", chunk, idx);
        XXH3_64bits_reset(&st);
        XXH3_64bits_update(&st, volume, strlen(volume));
        XXH3_64bits_update(&st, tail, (size_t)(m > 0 ? m : 0));
        return XXH3_64bits_digest(&st);
    }
    return XXH3_64bits(name, (size_t)n);
}

/* lz4-decode `payload` (len bytes) into out (exactly out_len bytes) when flagged; 0 or -1 with msg. */
static inline int lz4_block(const header_t *hd, const uint8_t *payload, size_t len, uint8_t *out, size_t out_len,
                            char *msg) {
    if (hd->flags & FLAG_LZ4) {
        LZ4F_dctx *dctx = NULL;
        if (LZ4F_isError(LZ4F_createDecompressionContext(&dctx, LZ4F_VERSION))) {
            snprintf(msg, MSG_LEN, "lz4: out of memory");
            return -1;
        }
        size_t src_pos = 0, dst_pos = 0, ret = 1;
        /* Decode the first frame; bytes after its end are ignored, as lz4.frame.decompress does. */
        while (ret != 0) {
            size_t src_n = len - src_pos, dst_n = out_len - dst_pos;
            uint8_t spare;
            uint8_t *dst = dst_n ? out + dst_pos : &spare;
            if (!dst_n)
                dst_n = 1; /* room for one byte past raw_len: its arrival proves the length wrong */
            ret = LZ4F_decompress(dctx, dst, &dst_n, payload + src_pos, &src_n, NULL);
            if (LZ4F_isError(ret)) {
                snprintf(msg, MSG_LEN, "lz4 payload does not decode (%s)", LZ4F_getErrorName(ret));
                LZ4F_freeDecompressionContext(dctx);
                return -1;
            }
            src_pos += src_n;
            if (dst_pos + dst_n > out_len) {
                snprintf(msg, MSG_LEN, "raw length more than %zu", out_len);
                LZ4F_freeDecompressionContext(dctx);
                return -1;
            }
            dst_pos += dst_n;
            if (ret != 0 && src_n == 0 && dst_n == 0) { /* no progress: the input ended mid-frame */
                snprintf(msg, MSG_LEN, "lz4 payload does not decode (frame incomplete)");
                LZ4F_freeDecompressionContext(dctx);
                return -1;
            }
        }
        LZ4F_freeDecompressionContext(dctx);
        if (dst_pos != hd->raw_len) {
            snprintf(msg, MSG_LEN, "raw length %zu != %u", dst_pos, hd->raw_len);
            return -1;
        }
    }
    return 0;
}

/* Verify a block's raw (decoded) bytes against its header's seeded xxh3; 0 or -1 with msg. */
static inline int verify_raw(const header_t *hd, const uint8_t *raw, size_t len, uint64_t seed, char *msg) {
    if (bulk_xxh3_seeded(raw, len, hd->version == UNSEEDED ? 0 : seed) != hd->digest) {
        snprintf(msg, MSG_LEN, "checksum mismatch (damaged bytes, or a block of another chunk, index or volume)");
        return -1;
    }
    return 0;
}

/* Decode `payload` (len bytes) into out (out_len bytes, already sized by output_length) and
 * verify the checksum; 0 or -1 with msg. Uncompressed payloads must already be in out. */
static inline int finish_block(const header_t *hd, const uint8_t *payload, size_t len, uint8_t *out, size_t out_len,
                        uint64_t seed, char *msg) {
    if (lz4_block(hd, payload, len, out, out_len, msg))
        return -1;
    return verify_raw(hd, out, out_len, seed, msg);
}

/* pread `len` bytes at `off` (fewer at the end of the file: *got says); 0, or -1 with errno. */
static inline int read_all(int fd, uint8_t *buf, size_t len, size_t off, size_t *got) {
    *got = 0;
    while (*got < len) {
        ssize_t n = pread(fd, buf + *got, len - *got, (off_t)(off + *got));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0)
            break;
        *got += (size_t)n;
    }
    return 0;
}

#endif
