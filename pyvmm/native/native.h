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

/* ---- pyvmm.migration.pageio (pages.c): RAM page records written from / read into guest RAM ----
 * Records are QEMU's RAM section records: be64 (page * 4096 | flags), `u8 len, idstr` unless
 * CONTINUE (0x20), then one fill byte for ZERO (0x02) or the 4096 page bytes for PAGE (0x08);
 * or pyvmm's compressed page (0x400, compress.c): be16 n, then n bytes of zstd frame.
 * A run is consecutive pages of one kind (the page index's flags: PYVMM_RUN_*); in a data run
 * page k's bytes are at data_offset + k * 4104 in the file (data_offset is 0 in a zero run); in
 * a compressed run data_offset is the first record's be16 length, the others following it. */
enum { PYVMM_RUN_DATA = 0, PYVMM_RUN_ZERO = 1, PYVMM_RUN_COMPRESSED = 2 };
struct pyvmm_page_run {
    pyvmm_u64 first_page;
    pyvmm_u64 npages;
    pyvmm_u64 data_offset;
    int kind;
};
struct pyvmm_page_write_stats {
    pyvmm_u64 bytes_written; /* reached the file, also when the call failed */
    pyvmm_u64 data_pages;
    pyvmm_u64 zero_pages;
    pyvmm_u64 nruns;
    pyvmm_u64 compressed_pages; /* of data_pages, written as compressed records */
    pyvmm_u64 compressed_bytes; /* their zstd frames' bytes */
};
/* Where pyvmm_read_page_runs stopped: the run, the file offset, and for BAD_HEADER the page
 * whose header was wrong and the be64 found instead. */
struct pyvmm_page_read_error {
    pyvmm_u64 run;
    pyvmm_u64 offset;
    pyvmm_u64 page;
    pyvmm_u64 found;
};
/* Positive results of pyvmm_read_page_runs: the file is bad (negative ones are -errno). */
enum {
    PYVMM_PAGEIO_RUN_OUTSIDE_BLOCK = 1,
    PYVMM_PAGEIO_RUN_OUTSIDE_FILE = 2,
    PYVMM_PAGEIO_TRUNCATED = 3,
    PYVMM_PAGEIO_BAD_HEADER = 4,
    PYVMM_PAGEIO_BAD_DATA = 5 /* a compressed record's length or frame is wrong (err->found: n) */
};
/* Writes at file_offset of fd one record per page set in `select` (npages bits), in page order,
 * by pwritev straight from the npages pages at base: the first record carries the idstr if
 * first_has_idstr, the others CONTINUE; with detect_zero an all-zero page becomes a ZERO record;
 * with level (a zstd level, 0: none) a page that compresses well becomes a compressed record.
 * Fills runs[0..max_runs) and *stats. 0 or -errno (-EOVERFLOW: more than max_runs runs;
 * -EINVAL: a level zstd does not have). */
int pyvmm_write_page_records(int fd, pyvmm_u64 file_offset, const void *base, pyvmm_u64 npages,
                             const pyvmm_u64 *select, const unsigned char *idstr,
                             unsigned idstr_len, int first_has_idstr, int detect_zero, int level,
                             struct pyvmm_page_run *runs, pyvmm_u64 max_runs,
                             struct pyvmm_page_write_stats *stats);
/* ---- compress.c: pyvmm's compressed page records (zstd) ----
 * pyvmm_level_valid: 1 for a zstd level the encoder takes. pyvmm_page_inflate: the n bytes at
 * src inflated into the 4096 at dst: 0, 1 when they are no compressed page, -ENOMEM.
 * pyvmm_inflate_runs: every compressed run of runs[0..nruns) (others are skipped) inflated into
 * the npages pages at base (NULL: each into a scratch page, only checked), reading fd no
 * further than `end`: 0, -errno or PYVMM_PAGEIO_*. */
int pyvmm_level_valid(int level);
int pyvmm_page_inflate(const void *src, pyvmm_u64 len, void *dst);
int pyvmm_inflate_runs(int fd, void *base, pyvmm_u64 npages, const struct pyvmm_page_run *runs,
                       pyvmm_u64 nruns, pyvmm_u64 end, struct pyvmm_page_read_error *err);
/* runs[0..nruns) of RAM block number `block` as 24-byte page index records (the container's
 * big-endian layout: be16 block, u8 flags, u8 0, be32 npages, be64 first page, be64 data
 * offset) into out[0 .. 24*nruns). 0, or -EOVERFLOW (nothing to rely on in out) when a block
 * number or a run length does not fit its field. */
/* Checks every run against the npages pages at base and fd's size, then for each run in order:
 * a data run is read by preadv into guest RAM and every page's header but the first checked;
 * a zero run's pages that are not zero are cleared. 0, -errno or PYVMM_PAGEIO_*, with *err. */
int pyvmm_read_page_runs(int fd, void *base, pyvmm_u64 npages, const struct pyvmm_page_run *runs,
                         pyvmm_u64 nruns, struct pyvmm_page_read_error *err);

/* ---- pyvmm.migration.postcopy_uffd (uffd.c, wp_session.c): userfaultfd and PAGEMAP_SCAN ----
 * Thin wrappers: 0 (or a count, or an fd) on success, -errno on failure. Addresses are u64. */
/* via_dev: ioctl USERFAULTFD_IOC_NEW on /dev/userfaultfd, else the userfaultfd syscall.
 * The fd is O_NONBLOCK | O_CLOEXEC; user_mode_only adds UFFD_USER_MODE_ONLY. */
int pyvmm_uffd_open(int via_dev, int user_mode_only);
int pyvmm_uffd_api(int fd, pyvmm_u64 features, pyvmm_u64 *features_out, pyvmm_u64 *ioctls_out);
int pyvmm_uffd_register(int fd, pyvmm_u64 start, pyvmm_u64 len, pyvmm_u64 mode,
                        pyvmm_u64 *ioctls_out);
int pyvmm_uffd_unregister(int fd, pyvmm_u64 start, pyvmm_u64 len);
int pyvmm_uffd_writeprotect(int fd, pyvmm_u64 start, pyvmm_u64 len, pyvmm_u64 mode);
long pyvmm_uffd_copy(int fd, pyvmm_u64 dst, pyvmm_u64 src, pyvmm_u64 len, pyvmm_u64 mode);
long pyvmm_uffd_zeropage(int fd, pyvmm_u64 start, pyvmm_u64 len, pyvmm_u64 mode);
int pyvmm_uffd_wake(int fd, pyvmm_u64 start, pyvmm_u64 len);
/* PAGEMAP_SCAN over the npages 4 KiB pages at base for PAGE_IS_WRITTEN, re-protecting what it
 * reports (WP_MATCHING | CHECK_WPASYNC), vec_len regions per ioctl; sets the pages found in
 * bitmap (atomically) and returns how many, or -errno. *ioctls_out = ioctl calls made. */
long pyvmm_pagemap_scan_written(int pagemap_fd, pyvmm_u64 base, pyvmm_u64 npages,
                                pyvmm_u64 *bitmap, pyvmm_u64 vec_len, pyvmm_u64 *ioctls_out);
/* The same, re-protecting only with `protect`; bitmap may be NULL (count only). Without
 * protect nothing changes: the written pages are only counted (QFS's nb_dirty_pages). */
long pyvmm_pagemap_written(int pagemap_fd, pyvmm_u64 base, pyvmm_u64 npages, pyvmm_u64 *bitmap,
                           pyvmm_u64 vec_len, pyvmm_u64 *ioctls_out, int protect);
/* Baseline for benchmarks/bench_uffd.py (uffdbare.c): the npages 4 KiB pages at base (not
 * registered with any uffd; they are filled first) but the last written once each (one memset)
 * under write protection, each fault resolved by a bare 4 KiB unprotect (thread mode: a handler
 * thread on handler_cpu blocked in read(); signal_mode: the writer's own SIGBUS handler, which
 * replaces pyvmm's meanwhile: no signal-mode session may be running); cpus < 0: not pinned.
 * *seconds: the memset's wall time. 0 or -errno. */
int pyvmm_uffd_bare_wp_faults(int signal_mode, void *base, pyvmm_u64 npages, int handler_cpu,
                              int writer_cpu, double *seconds);
/* Synchronous write-protect session: a C thread resolving WP faults on uffd with shadow copies.
 * The handle is opaque; NULL from _new means out of memory. unprotect_pages: pages opened per
 * fault (aligned run). cpu < 0: no pinning. Page states: 0 none, 1 being saved, 2 sent. */
void *pyvmm_wp_session_new(int uffd, unsigned int max_blocks, unsigned int nslots,
                           pyvmm_u64 unprotect_pages);
int pyvmm_wp_session_add_block(void *session, pyvmm_u64 base, pyvmm_u64 npages,
                               pyvmm_u64 *dirty);
int pyvmm_wp_session_start(void *session, int cpu);
int pyvmm_wp_session_set_cpu(void *session, int cpu);
/* Signal mode: the session's RAM is registered and protected; faults on it are resolved from
 * now on (before, a SIGBUS on it is retried: it may come from an earlier session's uffd). */
int pyvmm_wp_session_arm(void *session);
int pyvmm_wp_session_stop(void *session);
void pyvmm_wp_session_free(void *session);
/* 1 and the oldest queued shadow copy, or 0 when the queue is empty */
int pyvmm_wp_session_next_shadow(void *session, unsigned int *block, pyvmm_u64 *page,
                                 unsigned int *slot);
void *pyvmm_wp_session_slot_addr(void *session, unsigned int slot);
int pyvmm_wp_session_release_shadow(void *session, unsigned int slot);
/* Claim a page not yet saved and copy it (4 KiB) from RAM to out: 1, or 0 if already claimed */
int pyvmm_wp_session_take_page(void *session, unsigned int block, pyvmm_u64 page, void *out);
pyvmm_u64 pyvmm_wp_session_mark_sent(void *session, unsigned int block, pyvmm_u64 start,
                                     pyvmm_u64 count);
int pyvmm_wp_session_page_state(void *session, unsigned int block, pyvmm_u64 page);
/* out[5]: faults handled, shadow copies, pool-full waits, queued copies, handler errno */
void pyvmm_wp_session_counters(void *session, pyvmm_u64 *out);

/* ---- pyvmm.migration.cow (cow.c): fork-based snapshot writer ----
 * One job per RAM block: the pages set in `select` are written as by pyvmm_write_page_records,
 * its runs going to runs[runs_index .. runs_index + max_runs) of the shared run array. */
struct pyvmm_cow_job {
    const void *base;
    pyvmm_u64 npages;
    const pyvmm_u64 *select;
    const unsigned char *idstr;
    unsigned idstr_len;
    int first_has_idstr;
    int detect_zero;
    int level;
    pyvmm_u64 runs_index;
    pyvmm_u64 max_runs;
};
/* Filled by the child in a MAP_SHARED area; read by the parent after waitpid. stage: the job
 * that failed, or njobs when writing the tail failed. error: errno, 0 on success. */
struct pyvmm_cow_result {
    int status;
    int error;
    unsigned stage;
    pyvmm_u64 bytes_written;
};
enum { PYVMM_COW_RUNNING = 0, PYVMM_COW_DONE = 1, PYVMM_COW_FAILED = 2 };
enum { PYVMM_COW_EXIT_FAILED = 1 }; /* the child's exit code when it failed with an errno */
/* MAP_SHARED | MAP_ANONYMOUS area the child reports through; NULL with errno on failure. */
void *pyvmm_cow_area_map(pyvmm_u64 length);
int pyvmm_cow_area_unmap(void *addr, pyvmm_u64 length); /* 0 or -errno */
/* Forks; the child writes every job's records from file_offset on, then the tail bytes, fills
 * *result and job_stats[0..njobs), and _exits (0, or PYVMM_COW_EXIT_FAILED). result, job_stats
 * and runs must lie in a shared area. child_delay_ns: the child sleeps first (a test hook).
 * Returns the child's pid in the parent, or -errno if fork failed; *fork_ns = fork's duration. */
int pyvmm_cow_start(int fd, pyvmm_u64 file_offset, const struct pyvmm_cow_job *jobs,
                    unsigned njobs, const unsigned char *tail, pyvmm_u64 tail_len,
                    struct pyvmm_cow_result *result, struct pyvmm_page_write_stats *job_stats,
                    struct pyvmm_page_run *runs, pyvmm_u64 child_delay_ns,
                    pyvmm_u64 *fork_ns);
pyvmm_u64 pyvmm_wp_session_mark_sent_unselected(void *handle, unsigned int block,
                                               const pyvmm_u64 *keep);
int pyvmm_wp_session_rearm(void *handle, unsigned int block, const pyvmm_u64 *select);
/* Protect again the pages of `block` with a dirty bit (clearing the bits, or-ing them into
 * `carried` unless NULL): pages protected since, or -errno. */
long pyvmm_wp_session_reprotect(void *handle, unsigned int block, pyvmm_u64 *carried);
/* A failed round: unsaved pages count as saved, queued shadow copies are dropped. */
void pyvmm_wp_session_abandon_round(void *handle);
/* The C saver of a live checkpoint: per session block, the pages to save (NULL: none) and the
 * block's name for its first record. */
struct pyvmm_live_block {
    const pyvmm_u64 *select;
    const unsigned char *idstr;
    unsigned idstr_len;
};
struct pyvmm_live_run {
    unsigned block;
    int kind; /* PYVMM_RUN_* */
    pyvmm_u64 first_page;
    pyvmm_u64 npages;
    pyvmm_u64 data_offset;
};
struct pyvmm_live_save_stats {
    pyvmm_u64 bytes_written;
    pyvmm_u64 data_pages;
    pyvmm_u64 zero_pages;
    pyvmm_u64 from_shadow;
    pyvmm_u64 nruns;
    pyvmm_u64 compressed_pages; /* as in pyvmm_page_write_stats */
    pyvmm_u64 compressed_bytes;
};
/* Writes every selected page as it was at the round's start as QEMU RAM records at `offset` of
 * fd (pwritev, 64 records at a time): queued shadow copies first whenever there are any, the
 * other pages claimed and copied out of RAM; returns once every page is written and no handler
 * copy is pending.  Never needs the GIL.  0, -errno, or -EOVERFLOW when max_runs is short.
 * open_saved: unprotect each page once claimed from RAM (marking it dirty): for a session that
 * tracks nothing after this round. level: as pyvmm_write_page_records's (0: plain records). */
int pyvmm_wp_session_save(void *handle, int fd, pyvmm_u64 offset,
                          const struct pyvmm_live_block *blocks, struct pyvmm_live_run *runs,
                          pyvmm_u64 max_runs, int open_saved, int level,
                          struct pyvmm_live_save_stats *stats);
/* pages.c: runs as 24-byte page index records (the container's big-endian layout: be16 block,
 * u8 flags, u8 0, be32 npages, be64 first page, be64 data offset) into out[0 .. 24*nruns):
 * those of one RAM block (pyvmm_write_page_records's, block number `block`) or a live save's.
 * 0, or -EOVERFLOW (out not to be used) when a block number or a run length does not fit its
 * field. pyvmm_index_records_sort: records into RAM order (block, then first page). */
int pyvmm_index_records_from_runs(const struct pyvmm_page_run *runs, pyvmm_u64 nruns,
                                  unsigned block, unsigned char *out);
int pyvmm_index_records_from_live_runs(const struct pyvmm_live_run *runs, pyvmm_u64 nruns,
                                       unsigned char *out);
void pyvmm_index_records_sort(unsigned char *records, pyvmm_u64 nrecords);
/* Before start: a fault on the page right after the run the previous fault opened doubles the
 * run, up to max_pages (dirty tracking then over-counts up to max_pages - 1 pages per
 * sequential stretch); any other fault opens unprotect_pages again. */
int pyvmm_wp_session_set_fault_around(void *handle, pyvmm_u64 max_pages);
/* Before start: 0 = a handler thread reads the uffd (start pins it to cpu); 1 = the uffd has
 * UFFD_FEATURE_SIGBUS and a process-wide SIGBUS handler resolves each fault in the faulting
 * thread (no thread, no wakeup; the previous SIGBUS disposition still gets other faults). */
int pyvmm_wp_session_set_mode(void *handle, int mode);
/* nice 1..19: pyvmm_wp_session_save does its work on a new thread of that nice value (the
 * guest then gets the CPU first when both want it); 0: on the caller's thread (default). */
int pyvmm_wp_session_set_saver_nice(void *handle, int nice);

/* ---- pyvmm.migration.checksum (crc.c): CRC-32C of buffers, guest pages and page records ----
 * CRC-32C (Castagnoli), zlib-style: pass 0 to start, the previous result to continue.
 * The fastest the CPU has (carry-less multiply folding, the SSE4.2 instruction, or a portable
 * slicing-by-8 table); same results. */
unsigned int pyvmm_crc32c(unsigned int crc, const void *buf, pyvmm_u64 length);
/* The implementation in use: 0 portable tables, 1 SSE4.2 crc32 instruction, 2 PCLMUL folding,
 * 3 AVX2 + VPCLMULQDQ folding; and the best this CPU has (the default). */
int pyvmm_crc32c_hardware(void);
int pyvmm_crc32c_best_level(void);
/* Test and benchmark hook: use implementation `level` (capped at the best); returns the old one.
 * Not for use while other threads compute CRCs. */
int pyvmm_crc32c_set_hardware(int level);
/* out[k] = CRC-32C of page k of the npages pages at base; pages clear in `populated` (NULL =
 * all populated) are not read and get the CRC of a zero page. */
void pyvmm_crc32c_pages(const void *base, pyvmm_u64 page_size, pyvmm_u64 npages,
                        const pyvmm_u64 *populated, unsigned int *out);
/* Where a file CRC call stopped: the run (stream calls), the file offset, and for BAD_HEADER
 * the page of the run whose record header was wrong and the be64 found instead. */
struct pyvmm_crc_error {
    pyvmm_u64 run;
    pyvmm_u64 offset;
    pyvmm_u64 page;
    pyvmm_u64 found;
};
/* Positive results of the file CRC calls (negative ones are -errno). */
enum {
    PYVMM_CRC_TRUNCATED = 1, /* the file ends before the bytes asked for */
    PYVMM_CRC_BAD_RUNS = 2,  /* runs unsorted, overlapping or outside the stream */
    PYVMM_CRC_BAD_HEADER = 3 /* a page record header inside a run is not the expected one */
};
/* out[k] = CRC-32C of the page_size bytes at offset + k * stride of fd (pread in large chunks). */
int pyvmm_crc32c_file_pages(int fd, pyvmm_u64 offset, pyvmm_u64 npages, pyvmm_u64 page_size,
                            pyvmm_u64 stride, unsigned int *out, struct pyvmm_crc_error *err);
/* A data run of a stream: page k's bytes at data_offset + k * stride, its CRC to
 * page_crcs[out_index + k]; first_page: the page number the record headers carry. */
struct pyvmm_crc_run {
    pyvmm_u64 data_offset;
    pyvmm_u64 npages;
    pyvmm_u64 first_page;
    pyvmm_u64 out_index;
};
/* One pass over the stream [start, start+length) of fd: runs (sorted by data_offset, inside
 * the stream, not overlapping) split it into data extents (first page's data to last page's
 * data end) and nruns + 1 gaps; gap_crcs[i] = CRC-32C of the bytes before run i (i = nruns: after
 * the last run). With page_crcs, each page's CRC is stored and the record headers inside runs
 * checked; with page_crcs NULL, the data extents are not read at all. 0, -errno or PYVMM_CRC_*. */
int pyvmm_crc32c_stream(int fd, pyvmm_u64 start, pyvmm_u64 length,
                        const struct pyvmm_crc_run *runs, pyvmm_u64 nruns, pyvmm_u64 page_size,
                        pyvmm_u64 stride, unsigned int *page_crcs, unsigned int *gap_crcs,
                        struct pyvmm_crc_error *err);

/* ---- pyvmm.migration.lazy (lazy.c): lazy reload under userfaultfd MISSING mode ----
 * A page source table holds one long long per guest page of a block: the file offset of the
 * page's 4096 data bytes (pages of a run at data_offset + k * 4104), or -1 for a zero page. */
/* Apply an increment's page runs to a table (data runs: offsets, zero runs: -1); later calls
 * override earlier ones. 0, or -EINVAL if a run lies outside the npages pages. */
int pyvmm_lazy_table_apply(long long *table, pyvmm_u64 npages,
                           const struct pyvmm_page_run *runs, pyvmm_u64 nruns);
/* Apply one increment's page index, as its raw 24-byte records, to the tables of the nblocks
 * blocks, checking each record as the container's decoder does (flags, block, bounds, no page
 * twice, zero runs without data, data inside [stream_start, stream_end)). counts[0], counts[1]:
 * data and zero pages listed. 0, -ENOMEM, or -EINVAL with *bad = the first bad record (tables
 * then partly updated). */
int pyvmm_lazy_table_apply_index(long long *const *tables, const pyvmm_u64 *block_pages,
                                 unsigned nblocks, const unsigned char *records,
                                 pyvmm_u64 nrecords, pyvmm_u64 stream_start,
                                 pyvmm_u64 stream_end, pyvmm_u64 *counts, pyvmm_u64 *bad);
/* Discards (MADV_DONTNEED) the pages at base whose table entry is a file offset, so that they
 * are missing when RAM is registered: writing the pages inflated before the start may have
 * brought whole transparent huge pages in, zero-filled around them. 0 or -errno. */
int pyvmm_lazy_table_discard(void *base, const long long *table, pyvmm_u64 npages);
/* One past the last file byte the table refers to (0 if none); *data_pages = pages >= 0. */
pyvmm_u64 pyvmm_lazy_table_end(const long long *table, pyvmm_u64 npages, pyvmm_u64 *data_pages);
/* What went wrong first (error_kind), with errno (READ_FAILED, UFFD_FAILED), the block and
 * page concerned, the file offset, and for BAD_HEADER the be64 found instead. */
enum {
    PYVMM_LAZY_READ_FAILED = 1,
    PYVMM_LAZY_TRUNCATED = 2,
    PYVMM_LAZY_BAD_HEADER = 3,
    PYVMM_LAZY_UFFD_FAILED = 4
};
struct pyvmm_lazy_stats {
    pyvmm_u64 faults;      /* fault messages handled */
    pyvmm_u64 fault_pages; /* data pages installed by the fault handler */
    pyvmm_u64 zero_pages;  /* pages the fault handler mapped with UFFDIO_ZEROPAGE */
    pyvmm_u64 fill_pages;  /* data pages installed by the fill thread */
    pyvmm_u64 data_pages;  /* data pages in the tables: fault_pages + fill_pages once filled */
    pyvmm_u64 exists;      /* pages found installed already (EEXIST) */
    int fill_done;
    int error_kind;
    int error;
    unsigned error_block;
    pyvmm_u64 error_page;
    pyvmm_u64 error_offset;
    pyvmm_u64 error_found;
};
/* A loader for RAM registered in MISSING mode on uffd, reading fd. fault_run: pages served per
 * fault (aligned window, a power of two <= 1024); fill_run: pages per fill copy (<= 1024);
 * fill_nice: nice value added to the fill thread. NULL on bad arguments or out of memory. */
void *pyvmm_lazy_new(int uffd, int fd, unsigned int max_blocks, pyvmm_u64 fault_run,
                     pyvmm_u64 fill_run, int fill_nice);
/* table and present (one bit per page, zeroed) must outlive the loader; before any start. */
int pyvmm_lazy_add_block(void *handle, pyvmm_u64 base, pyvmm_u64 npages, const long long *table,
                         pyvmm_u64 *present);
int pyvmm_lazy_start_handler(void *handle, int cpu); /* cpu < 0: no pinning */
int pyvmm_lazy_start_fill(void *handle);
/* Block until the fill is done (1), a failure was recorded (2) or timeout_ms passed (0; < 0:
 * no timeout). Returns at once after pyvmm_lazy_stop (0 unless done or failed). */
int pyvmm_lazy_wait(void *handle, long long timeout_ms);
int pyvmm_lazy_stop(void *handle); /* stop and join both threads; 0 or -errno */
void pyvmm_lazy_free(void *handle);
void pyvmm_lazy_get_stats(void *handle, struct pyvmm_lazy_stats *out);

/* ---- pyvmm.migration.reload (indexed.c): an increment's page index claimed and read ----
 * records: nrecords raw 24-byte page index records (block, flags, reserved, npages, first page,
 * data offset; big-endian) of one increment, newer increments done first. Each record's pages
 * are claimed in claimed[block] (page bitmaps); data pages not claimed before are read into
 * bases[block] (block_pages[block] pages) with pyvmm_read_page_runs; zero runs are only claimed
 * (a fresh machine's RAM is zero). Data must lie in [stream_start, stream_end).
 * options->sieve_pages (0..PYVMM_CLAIM_MAX_SIEVE): a gap of at most this many page records
 * between two pages to read is read too (into a scratch buffer, then ignored) instead of
 * starting a new preadv; 0 reads nothing but the pages used. options->crcs (NULL: no checks):
 * per block, the CRC-32C each page must have once all increments are loaded; every page read is
 * compared with it, and pages of zero runs not claimed before must expect options->zero_crc.
 * 0, -errno, PYVMM_PAGEIO_*, PYVMM_CLAIM_BAD_RECORD (err->run = the record) or
 * PYVMM_CLAIM_BAD_CRC (err->run = the block, err->page, err->offset = the page data's file
 * offset, 0 for a page left zero, err->found = the CRC of the page as read). */
struct pyvmm_claim_options {
    pyvmm_u64 sieve_pages;
    const unsigned int *const *crcs;
    unsigned int zero_crc;
    /* with crcs: 1, a second thread checks a batch while the next one is read (a batch read
     * while it is busy is checked by the reading thread); 2, the same but the reading thread
     * waits for it instead (tests); 0, the reading thread checks every batch */
    int check_thread;
    /* whole-chain reader (pyvmm_chain_read_*): 1, every other window of RAM is read by a
     * second thread (each thread takes all the increments of its windows), and with crcs each
     * thread checks what it reads (check_thread is then ignored); 0, one thread reads all */
    int second_reader;
    /* 1: only compressed runs are read (inflated), data and zero runs only claimed: a lazy
     * reload's compressed pages, which it cannot find by offset, are in RAM before it starts */
    int compressed_only;
};
struct pyvmm_claim_result {
    pyvmm_u64 data_pages;  /* listed by the index */
    pyvmm_u64 zero_pages;  /* listed by the index */
    pyvmm_u64 pages_read;  /* not claimed by a newer increment, so read */
    pyvmm_u64 reads;       /* preadv calls (file-adjacent pages share one) */
    pyvmm_u64 sieved_bytes; /* read only to bridge gaps (sieve_pages) */
};
enum { PYVMM_CLAIM_BAD_RECORD = 16, PYVMM_CLAIM_BAD_CRC = 17, PYVMM_CLAIM_MAX_SIEVE = 64 };
int pyvmm_claim_read_index(int fd, const unsigned char *records, pyvmm_u64 nrecords,
                           unsigned nblocks, void *const *bases, const pyvmm_u64 *block_pages,
                           pyvmm_u64 *const *claimed, pyvmm_u64 page_size,
                           pyvmm_u64 stream_start, pyvmm_u64 stream_end,
                           const struct pyvmm_claim_options *options,
                           struct pyvmm_claim_result *result,
                           struct pyvmm_page_read_error *err);
/* The whole chain at once (chain_read.c), window by window through RAM and newest-first through
 * the increments inside each window, so that each huge page is filled while it is cached.
 * incs[k]: increment k's raw page index records and stream bounds, oldest first.
 * pyvmm_chain_check: every record checked as pyvmm_claim_read_index would (newest increment
 * first; on error *failed = the increment, err->run = the record) and counted into counts[k];
 * 0, or PYVMM_CHAIN_UNORDERED when some increment's runs are not in RAM order without overlap
 * (then read increment by increment with pyvmm_claim_read_index instead).
 * pyvmm_chain_read_new: NULL on ENOMEM or bad options; the arrays are copied, the records,
 * RAM, bitmaps and options->crcs must outlive the handle. pyvmm_chain_read_step: at least
 * max_pages more pages of RAM done (out->done when all are); 0, or the errors of
 * pyvmm_claim_read_index with out->failed = the increment. */
struct pyvmm_chain_increment {
    const unsigned char *records;
    pyvmm_u64 nrecords;
    pyvmm_u64 stream_start, stream_end;
};
struct pyvmm_chain_counts {
    pyvmm_u64 data_pages, zero_pages;
    /* of data_pages, in compressed runs: the window reader cannot cut those, so a chain that
     * holds any is read increment by increment (pyvmm_claim_read_index) */
    pyvmm_u64 compressed_pages;
};
struct pyvmm_chain_progress {
    int done;
    unsigned failed;
    pyvmm_u64 covered;                         /* pages of RAM done so far, all blocks */
    pyvmm_u64 pages_read, reads, sieved_bytes; /* so far */
};
enum { PYVMM_CHAIN_UNORDERED = 18 };
int pyvmm_chain_check(const struct pyvmm_chain_increment *incs, unsigned nincs,
                      unsigned nblocks, const pyvmm_u64 *block_pages, pyvmm_u64 page_size,
                      struct pyvmm_chain_counts *counts, unsigned *failed,
                      struct pyvmm_page_read_error *err);
void *pyvmm_chain_read_new(int fd, const struct pyvmm_chain_increment *incs, unsigned nincs,
                           unsigned nblocks, void *const *bases, const pyvmm_u64 *block_pages,
                           pyvmm_u64 *const *claimed, pyvmm_u64 page_size,
                           const struct pyvmm_claim_options *options);
int pyvmm_chain_read_step(void *handle, pyvmm_u64 max_pages, struct pyvmm_chain_progress *out,
                          struct pyvmm_page_read_error *err);
void pyvmm_chain_read_free(void *handle);
/* After the last increment: every page no increment claimed stays zero and must expect
 * options->zero_crc. 0 or PYVMM_CLAIM_BAD_CRC as above (nothing when options->crcs is NULL). */
int pyvmm_claim_check_unclaimed(unsigned nblocks, const pyvmm_u64 *block_pages,
                                pyvmm_u64 *const *claimed,
                                const struct pyvmm_claim_options *options,
                                struct pyvmm_page_read_error *err);

/* ---- pyvmm.migration.ram_handler (ramwalk.c): page records of a RAM section body ----
 * From w->offset, PAGE and ZERO records of the nblocks blocks (names[b]: a length byte, then the
 * name; bases[b], block_pages[b]) are parsed up to and including the EOS (w->eos = 1, w->offset
 * past it). Any other record, or one reaching past w->end, stops the walk with w->eos = 0 and
 * w->offset at that record, for the caller to parse. w->block: block of a CONTINUE record (-1
 * none), in and out. index: nindex raw page index records; a data run listed there is stepped
 * over whole with skip, or (not skip) read with pyvmm_read_page_runs. Without skip, page data is
 * copied to RAM and zero records fill their page. 0 or -errno (w->offset = the record). */
struct pyvmm_ram_walk {
    pyvmm_u64 offset;
    pyvmm_u64 end;
    int block;
    int eos;
    pyvmm_u64 pages;   /* page records walked (data and zero) */
};
int pyvmm_ram_walk(int fd, unsigned nblocks, const unsigned char *const *names,
                   void *const *bases, const pyvmm_u64 *block_pages, pyvmm_u64 page_size,
                   const unsigned char *index, pyvmm_u64 nindex, int skip,
                   struct pyvmm_ram_walk *w);
/* ---- pyvmm.migration.checksum (crcindex.c): an increment checked before a reload ----
 * records: the increment's nrecords raw 24-byte page index records (as for
 * pyvmm_claim_read_index). _apply checks each record (reserved byte, flags, inside its RAM block,
 * a zero run without data offset, data inside [stream_start, stream_end), no page listed twice:
 * seen[block] are scratch bitmaps of block_pages[block] bits, cleared first) and applies it to the
 * per-page CRC tables (tables[block], host order): data pages take page_crcs in page-index
 * order (exactly npage_crcs of them), zero pages zero_crc. No I/O. 0 when everything holds; else
 * -EINVAL or PYVMM_CRCINDEX_* with err->run the record; the tables are then partly updated. */
struct pyvmm_crcindex_result {
    pyvmm_u64 data_pages;
    pyvmm_u64 zero_pages;
    pyvmm_u64 data_runs;
};
struct pyvmm_crcindex_error {
    pyvmm_u64 run;
    pyvmm_u64 offset;
};
enum {
    PYVMM_CRCINDEX_BAD_RECORD = 1,   /* a record the container's decoder rejects */
    PYVMM_CRCINDEX_COUNTS = 2,       /* page or gap CRCs not as many as the index needs */
    PYVMM_CRCINDEX_OVERLAP = 3,      /* data extents overlap */
    PYVMM_CRCINDEX_TRUNCATED = 4,    /* the file ends inside the stream */
    PYVMM_CRCINDEX_GAP_MISMATCH = 5  /* a gap's CRC is not the block's */
};
int pyvmm_crcindex_apply(const unsigned char *records, pyvmm_u64 nrecords, unsigned nblocks,
                         unsigned int *const *tables, const pyvmm_u64 *block_pages,
                         pyvmm_u64 *const *seen, pyvmm_u64 page_size, pyvmm_u64 stream_start,
                         pyvmm_u64 stream_end, const unsigned int *page_crcs,
                         pyvmm_u64 npage_crcs, unsigned int zero_crc,
                         struct pyvmm_crcindex_result *result,
                         struct pyvmm_crcindex_error *err);
/* The data runs' extents of records (accepted by _apply), sorted by file offset and not
 * overlapping, cut the stream into data runs + 1 gaps, which are read and compared with gap_crcs
 * (ngap_crcs, file order). skip_headers: a gap that is just the 8-byte record header of the next
 * run's first page, continuing its block's records, is not read when gap_crcs has the CRC of
 * the header it must be (as the headers between the pages inside a run are never read here).
 * A stream of at least pyvmm_map_min() bytes is mapped and only its gaps are touched (a file
 * cut short under the mapping: SIGBUS caught, the gaps read again with pread); a shorter one is
 * read with pread, short extents read through. 0, -errno or PYVMM_CRCINDEX_*, with err->run
 * the gap (or record) and err->offset. */
int pyvmm_crcindex_gaps(int fd, const unsigned char *records, pyvmm_u64 nrecords,
                        pyvmm_u64 page_size, pyvmm_u64 stream_start, pyvmm_u64 stream_end,
                        const unsigned int *gap_crcs, pyvmm_u64 ngap_crcs, int skip_headers,
                        struct pyvmm_crcindex_error *err);
/* CRC-32C of the tables (block_pages[b] u32 each, as little-endian bytes, blocks in order):
 * the RAM digest of a checksum block. */
unsigned int pyvmm_crcindex_digest(unsigned nblocks, unsigned int *const *tables,
                                   const pyvmm_u64 *block_pages);

/* ---- pyvmm.migration.lazy (lazy.c): page data checked against the checksum capability ----
 * crcs: one CRC-32C per page of block `block` (added before): each page read from the file is
 * compared with it before it is installed; a mismatch is recorded as PYVMM_LAZY_BAD_CRC with
 * the page, its data's file offset and (error_found) the CRC found. Before any start; crcs must
 * outlive the loader. 0, -EBUSY or -EINVAL. */
enum { PYVMM_LAZY_BAD_CRC = 5 };
int pyvmm_lazy_set_block_crcs(void *handle, unsigned int block, const unsigned int *crcs);

/* ---- pyvmm.migration.checksum (crc.c, crcindex.c): the writer's side in C ----
 * out[k] = CRC-32C of the page_size bytes at pages[k] (three pages at a time). */
void pyvmm_crc32c_page_list(const void *const *pages, pyvmm_u64 npages, pyvmm_u64 page_size,
                            unsigned int *out);
/* out[k] = the CRC of the k-th data page of the records (page-index order) taken from
 * block_crcs[block][page] (per-page CRCs computed before, e.g. while the pages were written);
 * a NULL table refuses its block. 0, or PYVMM_CRCINDEX_BAD_RECORD / _COUNTS with err->run. */
int pyvmm_crcindex_gather(const unsigned char *records, pyvmm_u64 nrecords, unsigned nblocks,
                          const unsigned int *const *block_crcs, const pyvmm_u64 *block_pages,
                          unsigned int *out, pyvmm_u64 nout, struct pyvmm_crcindex_error *err);
/* out[k] = CRC-32C of the k-th data page of the records (page-index order) as it is in RAM
 * (bases[block], block_pages[block] pages); nout: the data pages the records hold. 0, or
 * PYVMM_CRCINDEX_BAD_RECORD / _COUNTS with err->run. */
int pyvmm_crcindex_ram_crcs(const unsigned char *records, pyvmm_u64 nrecords, unsigned nblocks,
                            void *const *bases, const pyvmm_u64 *block_pages,
                            pyvmm_u64 page_size, unsigned int *out, pyvmm_u64 nout,
                            struct pyvmm_crcindex_error *err);
/* pyvmm_crcindex_gaps computing: out[i] = CRC-32C of gap i (nout = data runs + 1), and
 * *last_gap = the file offset where the last gap starts. */
int pyvmm_crcindex_gap_crcs(int fd, const unsigned char *records, pyvmm_u64 nrecords,
                            pyvmm_u64 page_size, pyvmm_u64 stream_start, pyvmm_u64 stream_end,
                            unsigned int *out, pyvmm_u64 nout, pyvmm_u64 *last_gap,
                            struct pyvmm_crcindex_error *err);

/* ---- mapped reads of a checkpoint file (sigbus.c): the stream gap checks (crcindex.c) and the
 * RAM section walk in skip mode (ramwalk.c), which touch a few bytes a page ----
 * pyvmm_map_min sets the shortest stretch of the file they map (0: all; ~0: none, all read with
 * pread) and returns the previous setting (default 1 MiB); for tests and benchmarks, not
 * thread-safe against running calls. pyvmm_map_cut_short: how many mapped reads have taken
 * SIGBUS (the file cut short under the mapping) and were done again with pread. */
pyvmm_u64 pyvmm_map_min(pyvmm_u64 bytes);
pyvmm_u64 pyvmm_map_cut_short(void);

/* ---- pyvmm.vcpu_gate (vcpu.c): asynchronous pauses served on the vCPU thread ----
 * A UC_HOOK_BLOCK callback: when `requested` is set it clears it, records the block's address
 * and calls emu_stop (unicorn's uc_emu_stop): the vCPU stops before the block's first
 * instruction with PC = that address. Other threads only set `requested`. */
struct pyvmm_vcpu_gate {
    int requested;
    int (*emu_stop)(void *uc);
    pyvmm_u64 stopped_at;
    pyvmm_u64 stops;
    pyvmm_u64 insns; /* instructions of the blocks entered (A64: 4 bytes each) */
};
struct pyvmm_header_error {
    pyvmm_u64 record; /* the page index record whose run holds the wrong header */
    pyvmm_u64 page;   /* the page it is in front of */
    pyvmm_u64 offset; /* file offset of the header */
    pyvmm_u64 found;  /* what is there */
};
int pyvmm_check_record_headers(const unsigned char *map, pyvmm_u64 map_base, pyvmm_u64 map_len,
                               pyvmm_u64 stream_start, const unsigned char *records,
                               pyvmm_u64 nrecords, const unsigned char *const *names,
                               const unsigned char *name_lens, unsigned nblocks,
                               pyvmm_u64 page_size, struct pyvmm_header_error *err);
void pyvmm_vcpu_block_hook(void *uc, pyvmm_u64 address, unsigned int size, void *user_data);
