/* Page bitmaps, zero-page detection and host residency of guest RAM (the C half of pyvmm.ram).
 *
 * A bitmap is an array of u64 words in host order; bit b of word w stands for page 64*w + b.
 * Bits past the last page of the last word are always clear (the Python side keeps that true).
 * Every access to the words is atomic: the userfaultfd fault-handler thread sets and tests bits
 * while Python threads scan the same bitmap, and plain loads would be a data race in C11 terms.
 * Loads are acquire and read-modify-writes acq_rel so that "the bit is set" also publishes
 * whatever the setter wrote before setting it (e.g. a page copied to a shadow buffer).
 *
 * No function here touches a Python object, so cffi calls them with the GIL released.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "native.h"

typedef pyvmm_u64 u64;

#define WORD_BITS 64u

static inline u64 load_word(const u64 *words, u64 w) {
    return __atomic_load_n(&words[w], __ATOMIC_ACQUIRE);
}

/* Mask of bits [lo, hi) inside one word, 0 <= lo < hi <= 64. */
static inline u64 word_mask(unsigned lo, unsigned hi) {
    u64 upper = hi == WORD_BITS ? ~(u64)0 : (((u64)1 << hi) - 1);
    return upper & ~(((u64)1 << lo) - 1);
}

/* Shared walk for find_next_set/find_next_clear: `invert` flips every word so both become
 * "find the next one bit", one ctz per word. */
static u64 find_next(const u64 *words, u64 nbits, u64 start, u64 invert) {
    if (start >= nbits)
        return nbits;
    u64 w = start / WORD_BITS;
    u64 last = (nbits - 1) / WORD_BITS;
    u64 word = (load_word(words, w) ^ invert) & ~(((u64)1 << (start % WORD_BITS)) - 1);
    for (;;) {
        if (word) {
            u64 bit = w * WORD_BITS + (u64)__builtin_ctzll(word);
            /* an inverted tail word has ones past nbits: clamp them away */
            return bit < nbits ? bit : nbits;
        }
        if (++w > last)
            return nbits;
        word = load_word(words, w) ^ invert;
    }
}

u64 pyvmm_bitmap_find_next_set(const u64 *words, u64 nbits, u64 start) {
    return find_next(words, nbits, start, 0);
}

u64 pyvmm_bitmap_find_next_clear(const u64 *words, u64 nbits, u64 start) {
    return find_next(words, nbits, start, ~(u64)0);
}

u64 pyvmm_bitmap_count(const u64 *words, u64 start, u64 end) {
    if (start >= end)
        return 0;
    u64 first = start / WORD_BITS, last = (end - 1) / WORD_BITS;
    unsigned lo = (unsigned)(start % WORD_BITS), hi = (unsigned)((end - 1) % WORD_BITS) + 1;
    if (first == last)
        return (u64)__builtin_popcountll(load_word(words, first) & word_mask(lo, hi));
    u64 n = (u64)__builtin_popcountll(load_word(words, first) & word_mask(lo, WORD_BITS));
    for (u64 w = first + 1; w < last; w++)
        n += (u64)__builtin_popcountll(load_word(words, w));
    return n + (u64)__builtin_popcountll(load_word(words, last) & word_mask(0, hi));
}

/* Applies `set ? word |= mask : word &= ~mask` to every word covering bits [start, start+count). */
static void update_range(u64 *words, u64 start, u64 count, int set) {
    if (count == 0)
        return;
    u64 end = start + count;
    u64 first = start / WORD_BITS, last = (end - 1) / WORD_BITS;
    for (u64 w = first; w <= last; w++) {
        unsigned lo = w == first ? (unsigned)(start % WORD_BITS) : 0;
        unsigned hi = w == last ? (unsigned)((end - 1) % WORD_BITS) + 1 : WORD_BITS;
        u64 mask = word_mask(lo, hi);
        /* read-modify-write even on whole words: a concurrent single-bit update in the same
         * word must not be lost to a plain store */
        if (set)
            __atomic_fetch_or(&words[w], mask, __ATOMIC_ACQ_REL);
        else
            __atomic_fetch_and(&words[w], ~mask, __ATOMIC_ACQ_REL);
    }
}

void pyvmm_bitmap_set_range(u64 *words, u64 start, u64 count) {
    update_range(words, start, count, 1);
}

void pyvmm_bitmap_clear_range(u64 *words, u64 start, u64 count) {
    update_range(words, start, count, 0);
}

static inline u64 bit_mask(u64 bit) { return (u64)1 << (bit % WORD_BITS); }

void pyvmm_bitmap_set_bit(u64 *words, u64 bit) {
    __atomic_fetch_or(&words[bit / WORD_BITS], bit_mask(bit), __ATOMIC_ACQ_REL);
}

void pyvmm_bitmap_clear_bit(u64 *words, u64 bit) {
    __atomic_fetch_and(&words[bit / WORD_BITS], ~bit_mask(bit), __ATOMIC_ACQ_REL);
}

int pyvmm_bitmap_test_bit(const u64 *words, u64 bit) {
    return (load_word(words, bit / WORD_BITS) & bit_mask(bit)) != 0;
}

int pyvmm_bitmap_test_and_set_bit(u64 *words, u64 bit) {
    u64 m = bit_mask(bit);
    return (__atomic_fetch_or(&words[bit / WORD_BITS], m, __ATOMIC_ACQ_REL) & m) != 0;
}

int pyvmm_bitmap_test_and_clear_bit(u64 *words, u64 bit) {
    u64 m = bit_mask(bit);
    return (__atomic_fetch_and(&words[bit / WORD_BITS], ~m, __ATOMIC_ACQ_REL) & m) != 0;
}

void pyvmm_bitmap_or(u64 *dst, const u64 *src, u64 nwords) {
    for (u64 w = 0; w < nwords; w++) {
        u64 s = load_word(src, w);
        if (s)
            __atomic_fetch_or(&dst[w], s, __ATOMIC_ACQ_REL);
    }
}

void pyvmm_bitmap_and(u64 *dst, const u64 *src, u64 nwords) {
    for (u64 w = 0; w < nwords; w++) {
        u64 s = load_word(src, w);
        if (s != ~(u64)0)
            __atomic_fetch_and(&dst[w], s, __ATOMIC_ACQ_REL);
    }
}

void pyvmm_bitmap_andnot(u64 *dst, const u64 *src, u64 nwords) {
    for (u64 w = 0; w < nwords; w++) {
        u64 s = load_word(src, w);
        if (s)
            __atomic_fetch_and(&dst[w], ~s, __ATOMIC_ACQ_REL);
    }
}

/* Zero check of one page. Most non-zero pages have data in their first bytes, so the first
 * word is tested alone; the rest is OR-ed in 256-byte blocks (wide enough for the compiler to
 * vectorise, short enough to stop early). */
int pyvmm_page_is_zero(const void *page, u64 length) {
    const unsigned char *bytes = page;
    size_t nwords = length / sizeof(u64);
    u64 first;
    if (nwords) {
        memcpy(&first, bytes, sizeof first);
        if (first)
            return 0;
    }
    size_t i = 0;
    for (; i + 32 <= nwords; i += 32) {
        u64 block[32];
        u64 acc = 0;
        memcpy(block, bytes + i * sizeof(u64), sizeof block);
        for (int k = 0; k < 32; k++)
            acc |= block[k];
        if (acc)
            return 0;
    }
    for (size_t k = i * sizeof(u64); k < length; k++)
        if (bytes[k])
            return 0;
    return 1;
}

u64 pyvmm_scan_zero_pages(const void *base, u64 page_size, u64 npages, const u64 *select,
                          const u64 *populated, u64 *zero_out) {
    const unsigned char *mem = base;
    u64 nzero = 0;
    u64 nwords = (npages + WORD_BITS - 1) / WORD_BITS;
    for (u64 w = 0; w < nwords; w++) {
        u64 valid = w == nwords - 1 ? word_mask(0, (unsigned)((npages - 1) % WORD_BITS) + 1)
                                    : ~(u64)0;
        u64 wanted = (select ? load_word(select, w) : ~(u64)0) & valid;
        u64 present = populated ? load_word(populated, w) : ~(u64)0;
        /* never-populated pages read as zero: say so without reading (which would fault them in) */
        u64 zero = wanted & ~present;
        u64 todo = wanted & present;
        while (todo) {
            unsigned b = (unsigned)__builtin_ctzll(todo);
            todo &= todo - 1;
            if (pyvmm_page_is_zero(mem + (w * WORD_BITS + b) * page_size, page_size))
                zero |= (u64)1 << b;
        }
        __atomic_store_n(&zero_out[w], zero, __ATOMIC_RELEASE);
        nzero += (u64)__builtin_popcountll(zero);
    }
    return nzero;
}

/* Sets in `out` the guest pages covered by host pages h0..h0+n-1 whose `flags[i]` has `mask`.
 * Guest page g lies in host page g * page_size / host_page_size (a host page larger than a
 * guest page stands for several guest pages). */
static void host_flags_to_bits(u64 *out, u64 npages, u64 page_size, u64 host_page_size, u64 h0,
                               u64 n, const void *flags, unsigned flag_size, u64 mask) {
    const unsigned char *f = flags;
    u64 per_host = host_page_size / page_size;
    for (u64 i = 0; i < n; i++) {
        u64 v;
        if (flag_size == 1)
            v = f[i];
        else
            memcpy(&v, f + i * sizeof v, sizeof v);
        if (!(v & mask))
            continue;
        for (u64 g = (h0 + i) * per_host, end = g + per_host; g < end && g < npages; g++)
            out[g / WORD_BITS] |= (u64)1 << (g % WORD_BITS);
    }
}

static u64 host_pages_for(u64 npages, u64 page_size, u64 host_page_size) {
    return (npages * page_size + host_page_size - 1) / host_page_size;
}

#define VEC_CHUNK 16384u /* host pages per mincore call: 64 MiB of RAM per step */

int pyvmm_mincore_bitmap(void *addr, u64 npages, u64 page_size, u64 host_page_size, u64 *out) {
    unsigned char vec[VEC_CHUNK];
    u64 nhost = host_pages_for(npages, page_size, host_page_size);
    memset(out, 0, (npages + WORD_BITS - 1) / WORD_BITS * sizeof(u64));
    for (u64 h0 = 0; h0 < nhost; h0 += VEC_CHUNK) {
        u64 n = nhost - h0 < VEC_CHUNK ? nhost - h0 : VEC_CHUNK;
        if (mincore((char *)addr + h0 * host_page_size, n * host_page_size, vec) != 0)
            return -errno;
        host_flags_to_bits(out, npages, page_size, host_page_size, h0, n, vec, 1, 1);
    }
    return 0;
}

#define PM_PRESENT ((u64)1 << 63)
#define PM_SWAPPED ((u64)1 << 62)
#define PM_CHUNK 2048u /* pagemap entries per read: 16 KiB of stack, 8 MiB of RAM per step */

int pyvmm_pagemap_bitmap(void *addr, u64 npages, u64 page_size, u64 host_page_size, u64 *out) {
    u64 entries[PM_CHUNK];
    u64 nhost = host_pages_for(npages, page_size, host_page_size);
    u64 first_host = (u64)(uintptr_t)addr / host_page_size;
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    memset(out, 0, (npages + WORD_BITS - 1) / WORD_BITS * sizeof(u64));
    for (u64 h0 = 0; h0 < nhost; h0 += PM_CHUNK) {
        u64 n = nhost - h0 < PM_CHUNK ? nhost - h0 : PM_CHUNK;
        size_t want = (size_t)n * sizeof(u64), have = 0;
        while (have < want) {
            ssize_t got = pread(fd, (char *)entries + have, want - have,
                                (off_t)((first_host + h0) * sizeof(u64) + have));
            if (got <= 0) {
                int err = got < 0 ? errno : EIO;
                close(fd);
                return -err;
            }
            have += (size_t)got;
        }
        host_flags_to_bits(out, npages, page_size, host_page_size, h0, n, entries,
                           sizeof(u64), PM_PRESENT | PM_SWAPPED);
    }
    close(fd);
    return 0;
}

void *pyvmm_ram_mmap(u64 length, u64 align) {
    /* Over-reserve and trim so the block starts on `align` (2 MiB lets THP back it with huge
     * pages from the first byte). MAP_NORESERVE: only touched pages cost host memory.
     * MAP_PRIVATE: a fork()ed snapshot child sees the parent's RAM copy-on-write. */
    size_t span = length + (align > 1 ? align : 0);
    unsigned char *p = mmap(NULL, span, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    if (align > 1) {
        uintptr_t start = ((uintptr_t)p + align - 1) & ~(uintptr_t)(align - 1);
        size_t head = start - (uintptr_t)p;
        size_t tail = span - head - length;
        if (head)
            munmap(p, head);
        if (tail)
            munmap((unsigned char *)start + length, tail);
        p = (unsigned char *)start;
    }
    /* best effort: without THP the block still works, with more TLB misses */
    madvise(p, length, MADV_HUGEPAGE);
    return p;
}

int pyvmm_ram_munmap(void *addr, u64 length) {
    return munmap(addr, length) == 0 ? 0 : -errno;
}

int pyvmm_ram_discard(void *addr, u64 length) {
    return madvise(addr, length, MADV_DONTNEED) == 0 ? 0 : -errno;
}
