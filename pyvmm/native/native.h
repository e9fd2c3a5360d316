/* Declarations shared by pyvmm's C parts; also fed to cffi's cdef (keep it plain C, no macros). */
int pyvmm_native_version(void);

/* ---- pyvmm.ram (bitmap.c): page bitmaps, zero pages, host residency ----
 * A bitmap is an array of 64-bit words in host order, bit b of word w = page 64*w+b; bits past
 * the last page stay clear. Every word access is atomic (a fault-handler thread shares them).
 * pyvmm_u64 rather than uint64_t: this header is compiled without <stdint.h> in front of it. */
typedef unsigned long long pyvmm_u64;
pyvmm_u64 pyvmm_bitmap_find_next_set(const pyvmm_u64 *words, pyvmm_u64 nbits, pyvmm_u64 start);
pyvmm_u64 pyvmm_bitmap_find_next_clear(const pyvmm_u64 *words, pyvmm_u64 nbits, pyvmm_u64 start);
pyvmm_u64 pyvmm_bitmap_count(const pyvmm_u64 *words, pyvmm_u64 start, pyvmm_u64 end);
void pyvmm_bitmap_set_range(pyvmm_u64 *words, pyvmm_u64 start, pyvmm_u64 count);
void pyvmm_bitmap_clear_range(pyvmm_u64 *words, pyvmm_u64 start, pyvmm_u64 count);
void pyvmm_bitmap_set_bit(pyvmm_u64 *words, pyvmm_u64 bit);
void pyvmm_bitmap_clear_bit(pyvmm_u64 *words, pyvmm_u64 bit);
int pyvmm_bitmap_test_bit(const pyvmm_u64 *words, pyvmm_u64 bit);
int pyvmm_bitmap_test_and_set_bit(pyvmm_u64 *words, pyvmm_u64 bit);
int pyvmm_bitmap_test_and_clear_bit(pyvmm_u64 *words, pyvmm_u64 bit);
void pyvmm_bitmap_or(pyvmm_u64 *dst, const pyvmm_u64 *src, pyvmm_u64 nwords);
void pyvmm_bitmap_and(pyvmm_u64 *dst, const pyvmm_u64 *src, pyvmm_u64 nwords);
void pyvmm_bitmap_andnot(pyvmm_u64 *dst, const pyvmm_u64 *src, pyvmm_u64 nwords);
/* 1 if the `length` bytes at `page` are all zero; returns at the first non-zero 256 bytes. */
int pyvmm_page_is_zero(const void *page, pyvmm_u64 length);
/* For each of the npages pages at base that is set in `select` (NULL = every page): its bit in
 * zero_out is set iff the page is all zero. Pages clear in `populated` (NULL = all populated)
 * count as zero and are not read. Overwrites every word of zero_out; returns the zero count. */
pyvmm_u64 pyvmm_scan_zero_pages(const void *base, pyvmm_u64 page_size, pyvmm_u64 npages,
                                const pyvmm_u64 *select, const pyvmm_u64 *populated,
                                pyvmm_u64 *zero_out);
/* Host state of the npages guest pages at addr, written over `out` (plain stores: a fresh
 * bitmap no other thread sees yet); 0 or -errno.
 * mincore: in host RAM now. pagemap: present or swapped out, i.e. populated at some point. */
int pyvmm_mincore_bitmap(void *addr, pyvmm_u64 npages, pyvmm_u64 page_size,
                         pyvmm_u64 host_page_size, pyvmm_u64 *out);
int pyvmm_pagemap_bitmap(void *addr, pyvmm_u64 npages, pyvmm_u64 page_size,
                         pyvmm_u64 host_page_size, pyvmm_u64 *out);
/* Private anonymous MAP_NORESERVE mapping of `length` bytes starting on a multiple of `align`
 * (a power of two), MADV_HUGEPAGE best effort; NULL with errno set on failure. */
void *pyvmm_ram_mmap(pyvmm_u64 length, pyvmm_u64 align);
int pyvmm_ram_munmap(void *addr, pyvmm_u64 length); /* 0 or -errno */
/* MADV_DONTNEED: hand the pages back to the host; they read as zero afterwards. 0 or -errno. */
int pyvmm_ram_discard(void *addr, pyvmm_u64 length);
