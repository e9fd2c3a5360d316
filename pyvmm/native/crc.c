/* CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) of buffers, guest pages and page records
 * in a file: the C half of pyvmm.migration.checksum.
 *
 * Four implementations with the same results, the best the CPU has chosen at run time
 * (__builtin_cpu_supports), the others kept selectable for tests and benchmarks:
 *   3 "vpclmulqdq": carry-less multiply folding over 256-bit registers (AVX2 + VPCLMULQDQ);
 *   2 "pclmul":     the same folding over 128-bit registers;
 *   1 "sse4.2":     the `crc32` instruction;
 *   0 "portable":   slicing-by-8 tables.
 * One buffer is one dependency chain: the crc32 instruction's latency is 3 cycles and its
 * throughput 1, so a single chain leaves 2/3 of it idle, and folding (independent blocks) runs
 * 2-2.5x faster (on the AMD EPYC machines here: 19 GB/s against 7.6 for 256 KiB in cache).
 * Pages are independent of each other, so levels 1-3 run the instruction over three pages at
 * once, which is as fast as folding here (both about 8 bytes a cycle) and has no setup or
 * reduction per page; running both side by side on different pages measured no faster (they
 * compete for the same units).
 * Folding: the message's CRC only depends on it modulo P, so a 128-bit block X followed by D more
 * bits can be replaced by X * x^D mod P, which two carry-less multiplies by constants give (see
 * fold_constants); blocks are folded forward onto the next ones until 16 bytes are left, and the
 * crc32 instruction reduces those. Several accumulators keep the multiplier busy.
 *
 * The file functions read with pread in large chunks into a private buffer; nothing here touches
 * a Python object, so cffi runs them with the GIL released.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "native.h"

typedef pyvmm_u64 u64;

#define POLY 0x82F63B78u
#define CHUNK (256u << 10) /* bytes read per pread: the buffer stays in L2 for the CRC pass */

static uint32_t table[8][256];
static int level;      /* the implementation in use: 0..3 as above */
static int best_level; /* the best this CPU has */

/* Folding constants for a distance of D bits: a 128-bit register holds, in the reflected order
 * of the CRC, H (its low qword: the 64 high-degree coefficients) and L (its high qword). Then
 * X * x^D = H * x^(64+D) + L * x^D, and a carry-less product of two reflected 64-bit values is
 * the reflected 128-bit product times x. So with k_h = reflect64(x^(63+D) mod P) and
 * k_l = reflect64(x^(D-1) mod P): X * x^D == clmul(H, k_h) ^ clmul(L, k_l)  (mod P). */
struct fold_k {
    uint64_t h, l;
};
static struct fold_k k128, k256, k384, k512, k768, k1024;

static uint32_t reflect32(uint32_t v) {
    uint32_t r = 0;
    for (int i = 0; i < 32; i++)
        r |= ((v >> i) & 1u) << (31 - i);
    return r;
}

/* x^n mod P, P = x^32 + 0x1EDC6F41 (the normal, unreflected form) */
static uint32_t xpow_mod(unsigned n) {
    uint64_t r = 1;
    while (n--) {
        r <<= 1;
        if (r >> 32)
            r ^= 0x11EDC6F41ull;
    }
    return (uint32_t)r;
}

static struct fold_k fold_constants(unsigned distance) {
    struct fold_k k = {(uint64_t)reflect32(xpow_mod(63 + distance)) << 32,
                       (uint64_t)reflect32(xpow_mod(distance - 1)) << 32};
    return k;
}

__attribute__((constructor)) static void crc_init(void) {
    for (unsigned n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ POLY : c >> 1;
        table[0][n] = c;
    }
    for (unsigned n = 0; n < 256; n++)
        for (int t = 1; t < 8; t++)
            table[t][n] = (table[t - 1][n] >> 8) ^ table[0][table[t - 1][n] & 0xff];
    k128 = fold_constants(128);
    k256 = fold_constants(256);
    k384 = fold_constants(384);
    k512 = fold_constants(512);
    k768 = fold_constants(768);
    k1024 = fold_constants(1024);
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2")) {
        best_level = 1;
        if (__builtin_cpu_supports("pclmul")) {
            best_level = 2;
            if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("vpclmulqdq"))
                best_level = 3;
        }
    }
#endif
    level = best_level;
}

/* ---- portable: slicing-by-8 on the inverted register ---- */

static uint32_t sw_update(uint32_t c, const unsigned char *p, size_t n) {
    while (n && ((uintptr_t)p & 7)) {
        c = (c >> 8) ^ table[0][(c ^ *p++) & 0xff];
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w = htole64(w) ^ c;
        c = table[7][w & 0xff] ^ table[6][(w >> 8) & 0xff] ^ table[5][(w >> 16) & 0xff] ^
            table[4][(w >> 24) & 0xff] ^ table[3][(w >> 32) & 0xff] ^
            table[2][(w >> 40) & 0xff] ^ table[1][(w >> 48) & 0xff] ^ table[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        c = (c >> 8) ^ table[0][(c ^ *p++) & 0xff];
    return c;
}

/* ---- SSE4.2 ---- */

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t hw_update(uint32_t c, const unsigned char *p,
                                                           size_t n) {
    uint64_t c64 = c; /* unaligned 8-byte loads: an 8-byte gap is one crc32 instruction */
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c64 = __builtin_ia32_crc32di(c64, w);
        p += 8;
        n -= 8;
    }
    c = (uint32_t)c64;
    while (n--)
        c = __builtin_ia32_crc32qi(c, *p++);
    return c;
}

/* Three independent registers x, y, z over bytes [i, end) of buffers a, b, d (a multiple of 8
 * bytes): the crc32 instruction's latency is hidden, not its throughput. */
__attribute__((target("sse4.2"))) static inline void crc3(uint64_t *x, uint64_t *y, uint64_t *z,
                                                         const unsigned char *a,
                                                         const unsigned char *b,
                                                         const unsigned char *d, size_t i,
                                                         size_t end) {
    uint64_t cx = *x, cy = *y, cz = *z;
    for (; i < end; i += 8) {
        uint64_t wa, wb, wd;
        memcpy(&wa, a + i, 8);
        memcpy(&wb, b + i, 8);
        memcpy(&wd, d + i, 8);
        cx = __builtin_ia32_crc32di(cx, wa);
        cy = __builtin_ia32_crc32di(cy, wb);
        cz = __builtin_ia32_crc32di(cz, wd);
    }
    *x = cx;
    *y = cy;
    *z = cz;
}

/* Three CRCs c[0..3) continued over three buffers of n bytes each (n a multiple of 8). */
__attribute__((target("sse4.2"))) static void hw_update3(uint32_t *c, const unsigned char *a,
                                                        const unsigned char *b,
                                                        const unsigned char *d, size_t n) {
    uint64_t x = c[0], y = c[1], z = c[2];
    crc3(&x, &y, &z, a, b, d, 0, n);
    c[0] = (uint32_t)x;
    c[1] = (uint32_t)y;
    c[2] = (uint32_t)z;
}

/* ---- carry-less multiply folding ---- */

__attribute__((target("pclmul,sse4.2"))) static inline __m128i fold128(__m128i x,
                                                                      struct fold_k k) {
    __m128i kk = _mm_set_epi64x((long long)k.l, (long long)k.h);
    return _mm_xor_si128(_mm_clmulepi64_si128(x, kk, 0x00), _mm_clmulepi64_si128(x, kk, 0x11));
}

/* The register after 16 more bytes, x, with a register of 0: the final reduction. */
__attribute__((target("pclmul,sse4.2"))) static inline uint32_t reduce128(__m128i x) {
    uint64_t lo = (uint64_t)_mm_cvtsi128_si64(x), hi = (uint64_t)_mm_extract_epi64(x, 1);
    return (uint32_t)_mm_crc32_u64(_mm_crc32_u64(0, lo), hi);
}

/* The register after n bytes (n a multiple of 64, at least 64): four 128-bit accumulators. */
__attribute__((target("pclmul,sse4.2"))) static uint32_t fold_xmm(uint32_t c,
                                                                 const unsigned char *p,
                                                                 size_t n) {
    __m128i a0 = _mm_loadu_si128((const __m128i *)p),
            a1 = _mm_loadu_si128((const __m128i *)(p + 16)),
            a2 = _mm_loadu_si128((const __m128i *)(p + 32)),
            a3 = _mm_loadu_si128((const __m128i *)(p + 48));
    a0 = _mm_xor_si128(a0, _mm_cvtsi32_si128((int)c));
    for (p += 64, n -= 64; n >= 64; p += 64, n -= 64) {
        a0 = _mm_xor_si128(fold128(a0, k512), _mm_loadu_si128((const __m128i *)p));
        a1 = _mm_xor_si128(fold128(a1, k512), _mm_loadu_si128((const __m128i *)(p + 16)));
        a2 = _mm_xor_si128(fold128(a2, k512), _mm_loadu_si128((const __m128i *)(p + 32)));
        a3 = _mm_xor_si128(fold128(a3, k512), _mm_loadu_si128((const __m128i *)(p + 48)));
    }
    a3 = _mm_xor_si128(_mm_xor_si128(a3, fold128(a0, k384)),
                       _mm_xor_si128(fold128(a1, k256), fold128(a2, k128)));
    return reduce128(a3);
}

__attribute__((target("avx2,vpclmulqdq,pclmul,sse4.2"))) static inline __m256i
fold256(__m256i x, struct fold_k k) {
    __m256i kk = _mm256_set_epi64x((long long)k.l, (long long)k.h, (long long)k.l, (long long)k.h);
    return _mm256_xor_si256(_mm256_clmulepi64_epi128(x, kk, 0x00),
                            _mm256_clmulepi64_epi128(x, kk, 0x11));
}

/* The register after n bytes (n a multiple of 128, at least 128): four 256-bit accumulators,
 * each two independent 128-bit lanes, so eight blocks 128 bytes apart. */
__attribute__((target("avx2,vpclmulqdq,pclmul,sse4.2"))) static uint32_t
fold_ymm(uint32_t c, const unsigned char *p, size_t n) {
    __m256i a0 = _mm256_loadu_si256((const __m256i *)p),
            a1 = _mm256_loadu_si256((const __m256i *)(p + 32)),
            a2 = _mm256_loadu_si256((const __m256i *)(p + 64)),
            a3 = _mm256_loadu_si256((const __m256i *)(p + 96));
    a0 = _mm256_xor_si256(a0, _mm256_set_epi64x(0, 0, 0, (long long)c));
    for (p += 128, n -= 128; n >= 128; p += 128, n -= 128) {
        a0 = _mm256_xor_si256(fold256(a0, k1024), _mm256_loadu_si256((const __m256i *)p));
        a1 = _mm256_xor_si256(fold256(a1, k1024), _mm256_loadu_si256((const __m256i *)(p + 32)));
        a2 = _mm256_xor_si256(fold256(a2, k1024), _mm256_loadu_si256((const __m256i *)(p + 64)));
        a3 = _mm256_xor_si256(fold256(a3, k1024), _mm256_loadu_si256((const __m256i *)(p + 96)));
    }
    /* each lane of a_j onto the same lane of a3, (3 - j) * 32 bytes on */
    a3 = _mm256_xor_si256(_mm256_xor_si256(a3, fold256(a0, k768)),
                          _mm256_xor_si256(fold256(a1, k512), fold256(a2, k256)));
    /* then a3's low lane onto its high lane, 16 bytes on */
    __m128i x = _mm_xor_si128(fold128(_mm256_castsi256_si128(a3), k128),
                              _mm256_extracti128_si256(a3, 1));
    return reduce128(x);
}

/* The register after two 256-bit accumulators 32 bytes apart (lo first): lo's lanes folded
 * onto hi's, then hi's low lane onto its high lane, then reduced. */
__attribute__((target("avx2,vpclmulqdq,pclmul,sse4.2"))) static inline uint32_t
fold_pair(__m256i lo, __m256i hi) {
    __m256i t = _mm256_xor_si256(hi, fold256(lo, k256));
    return reduce128(_mm_xor_si128(fold128(_mm256_castsi256_si128(t), k128),
                                   _mm256_extracti128_si256(t, 1)));
}

/* Seven pages of n bytes at once (n a multiple of 64, at least 128), CRCs to out[0..7): three
 * by crc32 instructions, four by carry-less multiply folding (two 256-bit accumulators each,
 * 64 bytes a step), in one loop. Either alone is bound by its own unit's latency (about 24
 * GB/s here); interleaved, both units work at once: about 30 GB/s. The accumulators are named
 * one by one: in an array, the compiler kept them in memory. */
__attribute__((target("avx2,vpclmulqdq,pclmul,sse4.2"))) static void
pages7(const unsigned char *const *pg, size_t n, unsigned int *out) {
    const unsigned char *x = pg[0], *y = pg[1], *z = pg[2];
    const unsigned char *p = pg[3], *q = pg[4], *r = pg[5], *s = pg[6];
    uint64_t cx = ~0u, cy = ~0u, cz = ~0u;
    const __m256i init = _mm256_set_epi64x(0, 0, 0, (long long)~0u);
#define LOAD(b, at) _mm256_loadu_si256((const __m256i *)((b) + (at)))
#define FOLD(acc, b, at) acc = _mm256_xor_si256(fold256(acc, k512), LOAD(b, at))
    __m256i p0 = _mm256_xor_si256(LOAD(p, 0), init), p1 = LOAD(p, 32);
    __m256i q0 = _mm256_xor_si256(LOAD(q, 0), init), q1 = LOAD(q, 32);
    __m256i r0 = _mm256_xor_si256(LOAD(r, 0), init), r1 = LOAD(r, 32);
    __m256i s0 = _mm256_xor_si256(LOAD(s, 0), init), s1 = LOAD(s, 32);
    crc3(&cx, &cy, &cz, x, y, z, 0, 64);
    for (size_t j = 64; j < n; j += 64) {
        FOLD(p0, p, j);
        FOLD(q0, q, j);
        FOLD(r0, r, j);
        FOLD(s0, s, j);
        FOLD(p1, p, j + 32);
        FOLD(q1, q, j + 32);
        FOLD(r1, r, j + 32);
        FOLD(s1, s, j + 32);
        crc3(&cx, &cy, &cz, x, y, z, j, j + 64);
    }
#undef FOLD
#undef LOAD
    out[0] = ~(uint32_t)cx;
    out[1] = ~(uint32_t)cy;
    out[2] = ~(uint32_t)cz;
    out[3] = ~fold_pair(p0, p1);
    out[4] = ~fold_pair(q0, q1);
    out[5] = ~fold_pair(r0, r1);
    out[6] = ~fold_pair(s0, s1);
}

#endif

#define FOLD_MIN 256 /* shorter buffers: the setup and reduction cost more than they save */

static uint32_t update(uint32_t c, const unsigned char *p, size_t n) {
#if defined(__x86_64__)
    if (level >= 2 && n >= FOLD_MIN) {
        size_t whole;
        if (level == 3) {
            whole = n & ~(size_t)127;
            c = fold_ymm(c, p, whole);
        } else {
            whole = n & ~(size_t)63;
            c = fold_xmm(c, p, whole);
        }
        p += whole;
        n -= whole;
    }
    if (level >= 1)
        return hw_update(c, p, n);
#endif
    return sw_update(c, p, n);
}

unsigned int pyvmm_crc32c(unsigned int crc, const void *buf, pyvmm_u64 length) {
    return ~update(~crc, buf, length);
}

int pyvmm_crc32c_hardware(void) { return level; }

int pyvmm_crc32c_best_level(void) { return best_level; }

int pyvmm_crc32c_set_hardware(int want) {
    int before = level;
    level = want < 0 ? 0 : want > best_level ? best_level : want;
    return before;
}

/* CRC of `count` whole pages of page_size bytes, `stride` bytes apart from `first`, to out[]. */
static void crc_pages(const unsigned char *first, u64 stride, u64 count, u64 page_size,
                      unsigned int *out) {
    u64 k = 0;
#if defined(__x86_64__)
    if (level == 3 && page_size % 64 == 0 && page_size >= 128) {
        for (; k + 7 <= count; k += 7) {
            const unsigned char *pg[7];
            for (int i = 0; i < 7; i++)
                pg[i] = first + (k + (u64)i) * stride;
            pages7(pg, page_size, out + k);
        }
    }
    if (level >= 1 && page_size % 8 == 0) {
        for (; k + 3 <= count; k += 3) {
            uint32_t c[3] = {~0u, ~0u, ~0u};
            const unsigned char *p = first + k * stride;
            hw_update3(c, p, p + stride, p + 2 * stride, page_size);
            out[k] = ~c[0];
            out[k + 1] = ~c[1];
            out[k + 2] = ~c[2];
        }
    }
#endif
    for (; k < count; k++)
        out[k] = ~update(~0u, first + k * stride, page_size);
}

void pyvmm_crc32c_page_list(const void *const *pages, pyvmm_u64 npages, pyvmm_u64 page_size,
                            unsigned int *out) {
    u64 k = 0;
#if defined(__x86_64__)
    if (level == 3 && page_size % 64 == 0 && page_size >= 128)
        for (; k + 7 <= npages; k += 7)
            pages7((const unsigned char *const *)pages + k, page_size, out + k);
    if (level >= 1 && page_size % 8 == 0) {
        for (; k + 3 <= npages; k += 3) {
            uint32_t c[3] = {~0u, ~0u, ~0u};
            hw_update3(c, pages[k], pages[k + 1], pages[k + 2], page_size);
            out[k] = ~c[0];
            out[k + 1] = ~c[1];
            out[k + 2] = ~c[2];
        }
    }
#endif
    for (; k < npages; k++)
        out[k] = ~update(~0u, pages[k], page_size);
}

void pyvmm_crc32c_pages(const void *base, pyvmm_u64 page_size, pyvmm_u64 npages,
                        const pyvmm_u64 *populated, unsigned int *out) {
    const unsigned char *mem = base;
    unsigned int zero = 0;
    u64 p = 0;
    if (populated == NULL) {
        crc_pages(mem, page_size, npages, page_size, out);
        return;
    }
    {
        /* the CRC of a zero page, for pages never populated (they read as zero) */
        static const unsigned char zeros[4096];
        uint32_t c = ~0u;
        for (u64 left = page_size; left;) {
            u64 n = left < sizeof zeros ? left : sizeof zeros;
            c = update(c, zeros, n);
            left -= n;
        }
        zero = ~c;
    }
    while (p < npages) {
        /* a stretch of pages with the same populated state */
        int set = (__atomic_load_n(&populated[p / 64], __ATOMIC_ACQUIRE) >> (p % 64)) & 1;
        u64 end = p + 1;
        while (end < npages &&
               (int)((__atomic_load_n(&populated[end / 64], __ATOMIC_ACQUIRE) >> (end % 64)) & 1) ==
                   set)
            end++;
        if (set)
            crc_pages(mem + p * page_size, page_size, end - p, page_size, out + p);
        else
            for (u64 k = p; k < end; k++)
                out[k] = zero;
        p = end;
    }
}

/* ---- reading a file in chunks ---- */

struct reader {
    int fd;
    unsigned char *buf;
    u64 cap;
    u64 start; /* file offset of buf[0] */
    u64 len;   /* valid bytes in buf */
    u64 end;   /* never read at or past this offset */
};

/* Make [pos, pos + min(want, ...)) available: returns a pointer to pos and sets *avail (> 0), or
 * NULL with *rc = -errno or PYVMM_CRC_TRUNCATED. `ahead`: read a whole chunk, not just `want`. */
static const unsigned char *reader_at(struct reader *r, u64 pos, u64 want, int ahead, u64 *avail,
                                      int *rc) {
    if (pos >= r->start && pos < r->start + r->len) {
        u64 have = r->start + r->len - pos;
        *avail = have < want ? have : want;
        return r->buf + (pos - r->start);
    }
    u64 n = ahead ? r->cap : (want < r->cap ? want : r->cap);
    if (n > r->end - pos)
        n = r->end - pos;
    u64 done = 0;
    while (done < n) {
        ssize_t got = pread(r->fd, r->buf + done, n - done, (off_t)(pos + done));
        if (got < 0) {
            if (errno == EINTR)
                continue;
            *rc = -errno;
            return NULL;
        }
        if (got == 0)
            break;
        done += (u64)got;
    }
    if (done == 0) {
        *rc = PYVMM_CRC_TRUNCATED;
        return NULL;
    }
    r->start = pos;
    r->len = done;
    *avail = done < want ? done : want;
    return r->buf;
}

/* CRC-32C (register form, not inverted) of [pos, pos+len) of the file. */
static int reader_crc(struct reader *r, u64 pos, u64 len, int ahead, uint32_t *c) {
    while (len) {
        u64 avail;
        int rc = 0;
        const unsigned char *p = reader_at(r, pos, len, ahead, &avail, &rc);
        if (p == NULL)
            return rc;
        *c = update(*c, p, avail);
        pos += avail;
        len -= avail;
    }
    return 0;
}

/* Per-page CRCs of a data run: pages at pos + k*stride; with check_headers, the 8 bytes before
 * every page but the first must be be64((first_page + k) * page_size | PAGE | CONTINUE). */
static int reader_run(struct reader *r, u64 pos, u64 npages, u64 first_page, u64 page_size,
                      u64 stride, int check_headers, unsigned int *out,
                      struct pyvmm_crc_error *err) {
    u64 k = 0;
    while (k < npages) {
        u64 page_pos = pos + k * stride;
        if (check_headers && k > 0) {
            unsigned char hdr[8];
            u64 hpos = page_pos - 8, got = 0;
            while (got < 8) {
                u64 avail;
                int rc = 0;
                const unsigned char *p = reader_at(r, hpos + got, 8 - got, 1, &avail, &rc);
                if (p == NULL) {
                    err->offset = hpos + got;
                    return rc;
                }
                memcpy(hdr + got, p, avail);
                got += avail;
            }
            u64 be, want = (first_page + k) * page_size | 0x28u;
            memcpy(&be, hdr, 8);
            if (be64toh(be) != want) {
                err->offset = hpos;
                err->page = k;
                err->found = be64toh(be);
                return PYVMM_CRC_BAD_HEADER;
            }
        }
        /* whole pages inside the buffer: the fast path, three at a time */
        if (page_pos >= r->start && page_pos + page_size <= r->start + r->len) {
            u64 fit = (r->start + r->len - page_pos - page_size) / stride + 1;
            if (fit > npages - k)
                fit = npages - k;
            if (check_headers && fit > 1) {
                /* headers of the following pages in the buffer are checked here too */
                const unsigned char *base = r->buf + (page_pos - r->start);
                for (u64 j = 1; j < fit; j++) {
                    u64 be, want = (first_page + k + j) * page_size | 0x28u;
                    memcpy(&be, base + j * stride - 8, 8);
                    if (be64toh(be) != want) {
                        fit = j; /* stop before it: the slow path reports it */
                        break;
                    }
                }
            }
            crc_pages(r->buf + (page_pos - r->start), stride, fit, page_size, out + k);
            k += fit;
            continue;
        }
        uint32_t c = ~0u;
        int rc = reader_crc(r, page_pos, page_size, 1, &c);
        if (rc) {
            err->offset = page_pos;
            return rc;
        }
        out[k] = ~c;
        k++;
    }
    return 0;
}

static int reader_open(struct reader *r, int fd, u64 end) {
    r->fd = fd;
    r->cap = CHUNK;
    r->buf = malloc(r->cap);
    r->start = r->len = 0;
    r->end = end;
    return r->buf ? 0 : -ENOMEM;
}

int pyvmm_crc32c_file_pages(int fd, pyvmm_u64 offset, pyvmm_u64 npages, pyvmm_u64 page_size,
                            pyvmm_u64 stride, unsigned int *out, struct pyvmm_crc_error *err) {
    struct reader r;
    memset(err, 0, sizeof *err);
    if (npages == 0)
        return 0;
    if (stride < page_size || page_size == 0)
        return -EINVAL;
    int rc = reader_open(&r, fd, offset + (npages - 1) * stride + page_size);
    if (rc)
        return rc;
    rc = reader_run(&r, offset, npages, 0, page_size, stride, 0, out, err);
    free(r.buf);
    return rc;
}

int pyvmm_crc32c_stream(int fd, pyvmm_u64 start, pyvmm_u64 length,
                        const struct pyvmm_crc_run *runs, pyvmm_u64 nruns, pyvmm_u64 page_size,
                        pyvmm_u64 stride, unsigned int *page_crcs, unsigned int *gap_crcs,
                        struct pyvmm_crc_error *err) {
    struct reader r;
    u64 end = start + length, pos = start;
    int ahead = page_crcs != NULL;
    memset(err, 0, sizeof *err);
    if (stride < page_size || page_size == 0 || end < start)
        return -EINVAL;
    /* runs sorted, inside the stream, not overlapping: checked before reading anything */
    for (u64 i = 0; i < nruns; i++) {
        const struct pyvmm_crc_run *run = &runs[i];
        if (run->npages == 0 || run->npages > length / stride + 1 || run->data_offset < pos ||
            run->data_offset > end ||
            (run->npages - 1) * stride + page_size > end - run->data_offset) {
            err->run = i;
            return PYVMM_CRC_BAD_RUNS;
        }
        pos = run->data_offset + (run->npages - 1) * stride + page_size;
    }
    int rc = reader_open(&r, fd, end);
    if (rc)
        return rc;
    pos = start;
    for (u64 i = 0; i <= nruns; i++) {
        u64 gap_end = i < nruns ? runs[i].data_offset : end;
        uint32_t c = ~0u;
        rc = reader_crc(&r, pos, gap_end - pos, ahead, &c);
        if (rc) {
            err->run = i;
            err->offset = pos;
            break;
        }
        gap_crcs[i] = ~c;
        if (i == nruns)
            break;
        const struct pyvmm_crc_run *run = &runs[i];
        if (page_crcs != NULL) {
            rc = reader_run(&r, run->data_offset, run->npages, run->first_page, page_size, stride,
                            1, page_crcs + run->out_index, err);
            if (rc) {
                err->run = i;
                break;
            }
        }
        pos = run->data_offset + (run->npages - 1) * stride + page_size;
    }
    free(r.buf);
    return rc;
}
