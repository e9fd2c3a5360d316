/* The indexed reload's inner loop (pyvmm.migration.reload): one increment's page index, as the
 * raw big-endian records of the file, claimed newest-first against per-block bitmaps and the
 * pages no newer increment holds read straight into guest RAM. Python runs once per increment,
 * never per run: with scattered writes an index holds a run per page.
 *
 * With checksums, each page read is compared with the CRC-32C the file's checksum table expects
 * right after its batch is read (small batches then, so the pages are still in the cache), and
 * every page left zero (zero runs, pages no increment holds) must expect a zero page: the
 * reloaded RAM is checked without a second pass over it. */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "internal.h"

#define STRIDE_HEADER 8

#define BATCH_IOV 1024 /* IOV_MAX on Linux */
#define CHECKED_BATCH_IOV 256 /* with CRC checks: 128 pages, 512 KiB, checked while cached */
#define PAGE_FLAGS_CONTINUE_PAGE 0x28

/* Pages that follow each other in the file (one 8-byte record header apart), read by one
 * preadv however scattered they are in RAM; the headers in between go to `headers` and are
 * checked afterwards. With sieving, a gap of up to `sieve` records a newer increment holds is
 * read into `scratch` (one buffer, reused by every gap: its contents are never looked at) rather
 * than ending the batch: a page copy costs less here than the preadv call it saves. */
struct batch {
    struct iovec iov[BATCH_IOV];
    unsigned char *scratch;
    pyvmm_u64 sieve_bytes;   /* largest gap read into scratch; 0: never */
    pyvmm_u64 sieved;        /* bytes read into scratch */
    unsigned char headers[BATCH_IOV / 2][8];
    pyvmm_u64 expected[BATCH_IOV / 2];
    pyvmm_u64 header_page[BATCH_IOV / 2];
    pyvmm_u64 header_offset[BATCH_IOV / 2];
    unsigned niov, nheaders, max_iov;
    pyvmm_u64 start, end; /* file offsets of the batch */
    pyvmm_u64 preads;
    /* CRC checks (crcs NULL: none): the batch's pages, their block, page and data offset */
    const unsigned int *const *crcs;
    const void *page_dst[BATCH_IOV / 2];
    unsigned page_block[BATCH_IOV / 2];
    pyvmm_u64 page_no[BATCH_IOV / 2];
    pyvmm_u64 page_offset[BATCH_IOV / 2];
    unsigned npages;
    pyvmm_u64 page_size;
    struct checker *checker; /* NULL: CRCs checked by the reading thread */
    struct pyvmm_inflater *inflater; /* compressed runs (NULL: none may come) */
    unsigned tag, err_tag;   /* the caller's label of the pages added (an increment), and the
                                label of the pages a CRC error was found in */
};

/* Pages just read against the CRCs they must have. */
static int check_job(const void *const *dst, const unsigned *block, const pyvmm_u64 *page_no,
                     const pyvmm_u64 *offset, unsigned npages, const unsigned int *const *crcs,
                     pyvmm_u64 page_size, struct pyvmm_page_read_error *err) {
    unsigned int crc[BATCH_IOV / 2];
    pyvmm_crc32c_page_list(dst, npages, page_size, crc);
    for (unsigned k = 0; k < npages; k++) {
        if (crc[k] != crcs[block[k]][page_no[k]]) {
            err->run = block[k];
            err->page = page_no[k];
            err->offset = offset[k];
            err->found = crc[k];
            return PYVMM_CLAIM_BAD_CRC;
        }
    }
    return 0;
}

/* A helper thread's lifetime: started with its lock and two condition variables (`wake` for
 * it, `done` for whoever waits on it); stopped by setting `stop`, waking it, and joining it. */
struct helper {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t wake, done;
    int stop;
};

static int helper_start(struct helper *t, void *(*run)(void *), void *arg) {
    pthread_mutex_init(&t->lock, NULL);
    pthread_cond_init(&t->wake, NULL);
    pthread_cond_init(&t->done, NULL);
    t->stop = 0;
    if (pthread_create(&t->thread, NULL, run, arg) == 0) {
        pthread_setname_np(t->thread, "pyvmm-reader");
        return 0;
    }
    pthread_cond_destroy(&t->done);
    pthread_cond_destroy(&t->wake);
    pthread_mutex_destroy(&t->lock);
    return -1;
}

static void helper_stop(struct helper *t) {
    pthread_mutex_lock(&t->lock);
    t->stop = 1;
    pthread_cond_signal(&t->wake);
    pthread_mutex_unlock(&t->lock);
    pthread_join(t->thread, NULL);
    pthread_cond_destroy(&t->done);
    pthread_cond_destroy(&t->wake);
    pthread_mutex_destroy(&t->lock);
}

/* A second thread that checks a batch's CRCs while the next batch is read. One job at a time:
 * a batch read while the checker is still busy is checked by the reading thread itself, so a
 * checker kept off its core by other load never holds the reading back. */
enum { JOB_IDLE, JOB_QUEUED, JOB_RUNNING, JOB_DONE };
struct checker {
    struct helper t;
    int state, rc;
    int always;   /* a busy checker is waited for (tests): every batch is checked there */
    unsigned tag; /* the job's batch tag */
    struct pyvmm_page_read_error err;
    const unsigned int *const *crcs;
    pyvmm_u64 page_size;
    unsigned npages;
    const void *page_dst[BATCH_IOV / 2];
    unsigned page_block[BATCH_IOV / 2];
    pyvmm_u64 page_no[BATCH_IOV / 2];
    pyvmm_u64 page_offset[BATCH_IOV / 2];
};

static int run_job(struct checker *c) {
    return check_job(c->page_dst, c->page_block, c->page_no, c->page_offset, c->npages, c->crcs,
                     c->page_size, &c->err);
}

/* The queued job, run by this thread (lock held on entry and on return, not while running). */
static void take_and_run(struct checker *c) {
    c->state = JOB_RUNNING;
    pthread_mutex_unlock(&c->t.lock);
    int rc = run_job(c);
    pthread_mutex_lock(&c->t.lock);
    c->rc = rc;
    c->state = JOB_DONE;
    pthread_cond_signal(&c->t.done);
}

static void *checker_main(void *arg) {
    struct checker *c = arg;
    pthread_mutex_lock(&c->t.lock);
    for (;;) {
        while (c->state != JOB_QUEUED && !c->t.stop)
            pthread_cond_wait(&c->t.wake, &c->t.lock);
        if (c->state != JOB_QUEUED)
            break;
        take_and_run(c);
    }
    pthread_mutex_unlock(&c->t.lock);
    return NULL;
}

/* A finished job's result (lock held): 0 or its error, copied to *err (and its tag to *tag). */
static int take_result(struct checker *c, struct pyvmm_page_read_error *err, unsigned *tag) {
    int rc = c->rc;
    if (rc) {
        *err = c->err;
        *tag = c->tag;
    }
    c->state = JOB_IDLE;
    c->rc = 0;
    return rc;
}

static struct checker *checker_new(const unsigned int *const *crcs, pyvmm_u64 page_size,
                                   int always) {
    struct checker *c = calloc(1, sizeof *c);
    if (c == NULL)
        return NULL;
    c->always = always;
    c->crcs = crcs;
    c->page_size = page_size;
    if (helper_start(&c->t, checker_main, c)) {
        free(c);
        return NULL;
    }
    return c;
}

/* Waits for the job in flight (or runs it here if the checker has not started it); 0 or its
 * error. */
static int checker_drain(struct checker *c, struct pyvmm_page_read_error *err, unsigned *tag) {
    int rc = 0;
    pthread_mutex_lock(&c->t.lock);
    if (c->state == JOB_QUEUED)
        take_and_run(c);
    while (c->state == JOB_RUNNING)
        pthread_cond_wait(&c->t.done, &c->t.lock);
    if (c->state == JOB_DONE)
        rc = take_result(c, err, tag);
    pthread_mutex_unlock(&c->t.lock);
    return rc;
}

static void checker_free(struct checker *c) {
    if (c == NULL)
        return;
    helper_stop(&c->t);
    free(c);
}

/* The batch's pages against their CRCs: handed to the checker when it is free, else checked
 * here (just read, so still in this core's cache). An earlier job's error comes back first. */
#define HANDOFF_PAGES 32 /* smaller batches are checked here: the handoff costs more */

static int check_pages(struct batch *b, struct pyvmm_page_read_error *err) {
    struct checker *c = b->checker;
    if (c != NULL && (b->npages >= HANDOFF_PAGES || c->always)) {
        int rc = 0, queued = 0;
        pthread_mutex_lock(&c->t.lock);
        for (;;) {
            if (c->state == JOB_DONE && (rc = take_result(c, err, &b->err_tag)) != 0)
                break;
            if (c->state == JOB_IDLE) {
                unsigned n = b->npages;
                memcpy(c->page_dst, b->page_dst, n * sizeof b->page_dst[0]);
                memcpy(c->page_block, b->page_block, n * sizeof b->page_block[0]);
                memcpy(c->page_no, b->page_no, n * sizeof b->page_no[0]);
                memcpy(c->page_offset, b->page_offset, n * sizeof b->page_offset[0]);
                c->npages = n;
                c->tag = b->tag;
                c->state = JOB_QUEUED;
                pthread_cond_signal(&c->t.wake);
                queued = 1;
                break;
            }
            if (!c->always)
                break; /* busy: this batch is checked here */
            pthread_cond_wait(&c->t.done, &c->t.lock);
        }
        pthread_mutex_unlock(&c->t.lock);
        if (rc || queued)
            return rc;
    }
    b->err_tag = b->tag;
    return check_job(b->page_dst, b->page_block, b->page_no, b->page_offset, b->npages, b->crcs,
                     b->page_size, err);
}

static int batch_flush(int fd, struct batch *b, struct pyvmm_page_read_error *err) {
    if (b->niov == 0)
        return 0;
    int rc = pyvmm_preadv_all(fd, b->iov, (int)b->niov, b->start, err, &b->preads);
    if (rc)
        return rc;
    for (unsigned h = 0; h < b->nheaders; h++) {
        uint64_t found;
        memcpy(&found, b->headers[h], 8);
        found = be64toh(found);
        if (found != b->expected[h]) {
            err->offset = b->header_offset[h];
            err->page = b->header_page[h];
            err->found = found;
            return PYVMM_PAGEIO_BAD_HEADER;
        }
    }
    if (b->crcs != NULL && b->npages) {
        int rc = check_pages(b, err);
        if (rc)
            return rc;
    }
    b->niov = b->nheaders = b->npages = 0;
    return 0;
}

/* Queue page `page` of RAM block `block` at `dst`, whose data is at file offset `offset`. */
static int batch_add(int fd, struct batch *b, void *dst, unsigned block, pyvmm_u64 page,
                     pyvmm_u64 offset, pyvmm_u64 page_size, struct pyvmm_page_read_error *err) {
    const pyvmm_u64 stride = STRIDE_HEADER + page_size;
    pyvmm_u64 gap = b->niov && offset > b->end + 8 ? offset - 8 - b->end : 0;
    int sieve = gap && gap <= b->sieve_bytes && gap % stride == 0;
    if (b->niov && ((offset != b->end + 8 && !sieve) || b->niov + 3 > b->max_iov)) {
        int rc = batch_flush(fd, b, err);
        if (rc)
            return rc;
        sieve = 0;
    }
    if (b->niov == 0) {
        b->start = offset;
    } else {
        if (sieve) { /* whole records of pages a newer increment holds: read, not used */
            b->iov[b->niov].iov_base = b->scratch;
            b->iov[b->niov++].iov_len = gap;
            b->sieved += gap;
        }
        unsigned h = b->nheaders++;
        b->expected[h] = page * page_size | PAGE_FLAGS_CONTINUE_PAGE;
        b->header_page[h] = page;
        b->header_offset[h] = offset - 8;
        b->iov[b->niov].iov_base = b->headers[h];
        b->iov[b->niov++].iov_len = 8;
    }
    b->iov[b->niov].iov_base = dst;
    b->iov[b->niov++].iov_len = page_size;
    b->end = offset + page_size;
    if (b->crcs != NULL) {
        unsigned k = b->npages++;
        b->page_dst[k] = dst;
        b->page_block[k] = block;
        b->page_no[k] = page;
        b->page_offset[k] = offset;
    }
    return 0;
}

/* The next stretch [*start, *stop) of pages not claimed in bits, from *page up to `to`; 0 when
 * there is none. *page moves past the stretch. */
static int next_unclaimed(const pyvmm_u64 *bits, pyvmm_u64 to, pyvmm_u64 *page,
                          pyvmm_u64 *start, pyvmm_u64 *stop) {
    if (*page >= to || (*start = pyvmm_bitmap_find_next_clear(bits, to, *page)) >= to)
        return 0;
    *stop = pyvmm_bitmap_find_next_set(bits, to, *start);
    *page = *stop;
    return 1;
}

/* Pages [from, to) of `block` not claimed yet stay zero: each must expect a zero page. */
static int check_left_zero(const pyvmm_u64 *bits, pyvmm_u64 from, pyvmm_u64 to,
                           const struct pyvmm_claim_options *options, unsigned block,
                           struct pyvmm_page_read_error *err) {
    const unsigned int *want = options->crcs[block];
    pyvmm_u64 page = from, start, stop;
    while (next_unclaimed(bits, to, &page, &start, &stop)) {
        for (pyvmm_u64 p = start; p < stop; p++) {
            if (want[p] != options->zero_crc) {
                err->run = block;
                err->page = p;
                err->offset = 0;
                err->found = options->zero_crc;
                return PYVMM_CLAIM_BAD_CRC;
            }
        }
    }
    return 0;
}

/* A batch for claim_pages (NULL: out of memory). */
static struct batch *batch_new(const struct pyvmm_claim_options *options, pyvmm_u64 page_size) {
    struct batch *b = malloc(sizeof *b);
    if (b == NULL)
        return NULL;
    b->niov = b->nheaders = b->npages = 0;
    b->preads = 0;
    b->crcs = options->crcs;
    b->max_iov = options->crcs != NULL ? CHECKED_BATCH_IOV : BATCH_IOV;
    b->page_size = page_size;
    b->sieved = 0;
    b->sieve_bytes = options->sieve_pages * (STRIDE_HEADER + page_size);
    b->scratch = NULL;
    b->checker = NULL;
    b->inflater = NULL;
    b->tag = b->err_tag = 0;
    if (options->sieve_pages && (b->scratch = malloc(b->sieve_bytes)) == NULL) {
        free(b);
        return NULL;
    }
    /* without a thread (none can be made), the reading thread checks every batch itself */
    if (options->crcs != NULL && options->check_thread)
        b->checker = checker_new(options->crcs, page_size, options->check_thread == 2);
    return b;
}

/* The checker's last job: 0 or its error. Call before the batch is freed, once all is read. */
static int batch_finish(struct batch *b, struct pyvmm_page_read_error *err) {
    return b->checker != NULL ? checker_drain(b->checker, err, &b->err_tag) : 0;
}

static void batch_free(struct batch *b) {
    if (b != NULL) {
        checker_free(b->checker);
        free(b->scratch);
    }
    free(b);
}

/* Pages [from, to) of record `rec` (of `block`, RAM at `base`): a zero run's are checked
 * against the CRCs, a data run's not claimed yet are queued to be read (*pages_read counts
 * them); then all are claimed. */
static int claim_pages(int fd, struct batch *b, pyvmm_u64 *bits, unsigned block, void *base,
                       const struct pyvmm_index_record *rec, pyvmm_u64 from, pyvmm_u64 to,
                       const struct pyvmm_claim_options *options, pyvmm_u64 page_size,
                       pyvmm_u64 *pages_read, struct pyvmm_page_read_error *err) {
    const pyvmm_u64 stride = STRIDE_HEADER + page_size;
    if (rec->flags & PYVMM_INDEX_COMPRESSED) {
        /* whole runs only (from..to is the run), inflated now: their pages cannot be found
         * without walking the records, and a compressed run is short in the file */
        if (b->inflater == NULL || options->crcs != NULL || from != rec->first ||
            to != rec->first + rec->npages)
            return PYVMM_CLAIM_BAD_RECORD;
        return pyvmm_inflate_run(b->inflater, base, rec->first, rec->npages, rec->data_offset,
                                 bits, 1, err, pages_read);
    }
    if (options->compressed_only) {
        if (to > from)
            pyvmm_bitmap_set_range(bits, from, to - from);
        return 0;
    }
    if (rec->flags & PYVMM_INDEX_ZERO) {
        /* a fresh machine's RAM is zero already: claiming is all there is to do */
        if (options->crcs != NULL) {
            int rc = check_left_zero(bits, from, to, options, block, err);
            if (rc)
                return rc;
        }
    } else {
        pyvmm_u64 page = from, start, stop;
        while (next_unclaimed(bits, to, &page, &start, &stop)) {
            for (pyvmm_u64 p = start; p < stop; p++) {
                int rc = batch_add(fd, b, (char *)base + p * page_size, block, p,
                                   rec->data_offset + (p - rec->first) * stride, page_size, err);
                if (rc)
                    return rc;
            }
            *pages_read += stop - start;
        }
    }
    if (to > from)
        pyvmm_bitmap_set_range(bits, from, to - from);
    return 0;
}

int pyvmm_claim_check_unclaimed(unsigned nblocks, const pyvmm_u64 *block_pages,
                                pyvmm_u64 *const *claimed,
                                const struct pyvmm_claim_options *options,
                                struct pyvmm_page_read_error *err) {
    memset(err, 0, sizeof *err);
    if (options->crcs == NULL)
        return 0;
    for (unsigned block = 0; block < nblocks; block++) {
        int rc = check_left_zero(claimed[block], 0, block_pages[block], options, block, err);
        if (rc)
            return rc;
    }
    return 0;
}

/* The checks every record gets before any of its pages is claimed: 0 or the error (err->offset
 * set for data outside the stream). */
static int check_record(const struct pyvmm_index_record *rec, unsigned nblocks,
                        const pyvmm_u64 *block_pages, pyvmm_u64 page_size,
                        pyvmm_u64 stream_start, pyvmm_u64 stream_end,
                        struct pyvmm_page_read_error *err) {
    const pyvmm_u64 stride = STRIDE_HEADER + page_size;
    const pyvmm_u64 npages = rec->npages, data_offset = rec->data_offset;
    if (rec->reserved != 0 || (rec->flags & ~PYVMM_INDEX_FLAGS) != 0 ||
        rec->flags == PYVMM_INDEX_FLAGS)
        return PYVMM_CLAIM_BAD_RECORD;
    if (rec->block >= nblocks || npages == 0 || rec->first > block_pages[rec->block] ||
        npages > block_pages[rec->block] - rec->first)
        return PYVMM_PAGEIO_RUN_OUTSIDE_BLOCK;
    if (rec->flags & PYVMM_INDEX_ZERO)
        return data_offset == 0 ? 0 : PYVMM_CLAIM_BAD_RECORD; /* a zero run has no data */
    if (rec->flags & PYVMM_INDEX_COMPRESSED) { /* its records' lengths show as it is read */
        if (data_offset < stream_start || data_offset >= stream_end) {
            err->offset = data_offset;
            return PYVMM_PAGEIO_RUN_OUTSIDE_FILE;
        }
        return 0;
    }
    if (data_offset < stream_start ||
        (uint64_t)(npages - 1) > (stream_end - stream_start) / stride ||
        data_offset + (uint64_t)(npages - 1) * stride + page_size > stream_end ||
        data_offset + (uint64_t)(npages - 1) * stride + page_size < data_offset) {
        err->offset = data_offset;
        return PYVMM_PAGEIO_RUN_OUTSIDE_FILE;
    }
    return 0;
}

static int claim_read(int fd, const unsigned char *records, pyvmm_u64 nrecords,
                      unsigned nblocks, void *const *bases, const pyvmm_u64 *block_pages,
                      pyvmm_u64 *const *claimed, pyvmm_u64 page_size,
                      pyvmm_u64 stream_start, pyvmm_u64 stream_end,
                      const struct pyvmm_claim_options *options,
                      struct pyvmm_claim_result *result,
                      struct pyvmm_page_read_error *err, struct batch *b);

int pyvmm_claim_read_index(int fd, const unsigned char *records, pyvmm_u64 nrecords,
                           unsigned nblocks, void *const *bases, const pyvmm_u64 *block_pages,
                           pyvmm_u64 *const *claimed, pyvmm_u64 page_size,
                           pyvmm_u64 stream_start, pyvmm_u64 stream_end,
                           const struct pyvmm_claim_options *options,
                           struct pyvmm_claim_result *result,
                           struct pyvmm_page_read_error *err) {
    if (options->sieve_pages > PYVMM_CLAIM_MAX_SIEVE)
        return -EINVAL;
    memset(result, 0, sizeof *result);
    memset(err, 0, sizeof *err);
    struct batch *b = batch_new(options, page_size);
    struct pyvmm_inflater in;
    if (b == NULL || pyvmm_inflater_init(&in, fd, stream_end) != 0) {
        batch_free(b);
        return -ENOMEM;
    }
    b->inflater = &in;
    int rc = claim_read(fd, records, nrecords, nblocks, bases, block_pages, claimed, page_size,
                        stream_start, stream_end, options, result, err, b);
    result->sieved_bytes = b->sieved;
    result->reads += in.reads;
    pyvmm_inflater_free(&in);
    batch_free(b);
    return rc;
}

static int claim_read(int fd, const unsigned char *records, pyvmm_u64 nrecords,
                      unsigned nblocks, void *const *bases, const pyvmm_u64 *block_pages,
                      pyvmm_u64 *const *claimed, pyvmm_u64 page_size,
                      pyvmm_u64 stream_start, pyvmm_u64 stream_end,
                      const struct pyvmm_claim_options *options,
                      struct pyvmm_claim_result *result,
                      struct pyvmm_page_read_error *err, struct batch *b) {
    for (pyvmm_u64 i = 0; i < nrecords; i++) {
        const struct pyvmm_index_record rec =
            pyvmm_index_record(records + i * PYVMM_INDEX_RECORD);
        err->run = i;
        int rc = check_record(&rec, nblocks, block_pages, page_size, stream_start, stream_end,
                              err);
        if (rc)
            return rc;
        if (rec.flags & PYVMM_INDEX_ZERO)
            result->zero_pages += rec.npages;
        else
            result->data_pages += rec.npages;
        rc = claim_pages(fd, b, claimed[rec.block], rec.block, bases[rec.block], &rec, rec.first,
                         rec.first + rec.npages, options, page_size, &result->pages_read, err);
        if (rc)
            return rc;
    }
    int rc = batch_flush(fd, b, err);
    if (rc == 0)
        rc = batch_finish(b, err);
    result->reads = b->preads;
    return rc;
}

/* ---- the whole chain at once, window by window ----
 * Read increment by increment, the pages a newer increment scattered over RAM are written
 * first, each into a 2 MiB huge page the kernel zeroes for it, and the older increments fill
 * the rest of that huge page much later, when it has left the cache. Going through RAM a window
 * at a time, and through every increment (newest first) inside it, fills each huge page while
 * it is still cached: 5-9 % less time for a 16-increment chain of 1 GiB with scattered writes
 * (the rest of its gap to the squashed file is the kernel's cost per read call, ~1.9 us
 * whether by preadv or io_uring, and the sieved bytes that save calls: each page a newer
 * increment holds costs a copy, about 1 us, or a call to step over it; copying from a mapping
 * of the file instead was 10-20 % slower, its page-table work costing what the copies saved).
 * Every other window is read on a second thread (struct second_reader below). This needs each
 * increment's records in RAM order (blocks in index order, runs ascending, not overlapping),
 * as pyvmm writes them; a chain with an increment that is not is read increment by increment. */

#define WINDOW_PAGES 1024 /* 4 MiB of 4 KiB pages: two huge pages, well inside the L3 cache */

int pyvmm_chain_check(const struct pyvmm_chain_increment *incs, unsigned nincs,
                      unsigned nblocks, const pyvmm_u64 *block_pages, pyvmm_u64 page_size,
                      struct pyvmm_chain_counts *counts, unsigned *failed,
                      struct pyvmm_page_read_error *err) {
    int ordered = 1;
    memset(err, 0, sizeof *err);
    for (unsigned k = nincs; k-- > 0;) {
        const struct pyvmm_chain_increment *inc = &incs[k];
        pyvmm_u64 prev_block = 0, prev_end = 0;
        *failed = k;
        counts[k].data_pages = counts[k].zero_pages = counts[k].compressed_pages = 0;
        for (pyvmm_u64 i = 0; i < inc->nrecords; i++) {
            const struct pyvmm_index_record rec =
                pyvmm_index_record(inc->records + i * PYVMM_INDEX_RECORD);
            err->run = i;
            int bad = check_record(&rec, nblocks, block_pages, page_size, inc->stream_start,
                                   inc->stream_end, err);
            if (bad)
                return bad;
            if (rec.flags & PYVMM_INDEX_ZERO)
                counts[k].zero_pages += rec.npages;
            else
                counts[k].data_pages += rec.npages;
            if (rec.flags & PYVMM_INDEX_COMPRESSED)
                counts[k].compressed_pages += rec.npages;
            if (i > 0 &&
                (rec.block < prev_block || (rec.block == prev_block && rec.first < prev_end)))
                ordered = 0;
            prev_block = rec.block;
            prev_end = rec.first + rec.npages;
        }
    }
    err->run = 0;
    return ordered ? 0 : PYVMM_CHAIN_UNORDERED;
}

struct chain_read {
    int fd;
    unsigned nincs, nblocks;
    struct pyvmm_chain_increment *incs;
    pyvmm_u64 *cursor; /* per increment: its first record not wholly done */
    void **bases;
    pyvmm_u64 *block_pages;
    pyvmm_u64 **claimed;
    pyvmm_u64 page_size;
    struct pyvmm_claim_options options;
    unsigned block; /* where the next window starts */
    pyvmm_u64 page;
    pyvmm_u64 covered; /* pages of RAM done, over all blocks */
    pyvmm_u64 pages_read;
    struct batch *b;
    struct second_reader *second; /* NULL: this thread reads every window */
    int turn;                     /* the next window is the second reader's */
};

/* Every other window read on a second thread: windows are independent of each other (each
 * increment's claims in a window only concern that window's pages), so each thread takes all
 * the increments of its windows, newest first, with cursors of its own. The kernel's zeroing of
 * fresh huge pages and the copies from the page cache, most of a reload, then run on two cores.
 * Windows are whole bitmap words apart (WINDOW_PAGES is a multiple of 64), so the threads never
 * write the same word of a claimed bitmap, and never the same RAM. With CRCs each thread checks
 * the pages it reads. The reading thread waits for the second one only to hand it a window while
 * it is still busy with the last (one window in flight). */
struct second_reader {
    struct helper t;
    int queued, busy, rc;
    unsigned block;
    pyvmm_u64 w0, w1;
    pyvmm_u64 *cursors;   /* per increment: the first record not wholly done, its own */
    unsigned failed;      /* the increment of the error in rc */
    pyvmm_u64 pages_read; /* this thread's own, as is b */
    struct batch *b;
    pyvmm_u64 done_pages_read, done_reads, done_sieved; /* as of the last window (lock) */
    struct pyvmm_page_read_error err;
    struct chain_read *h;
};
static struct second_reader *second_new(struct chain_read *h);
static void second_free(struct second_reader *o);

void pyvmm_chain_read_free(void *handle) {
    struct chain_read *h = handle;
    if (h == NULL)
        return;
    second_free(h->second); /* first: it reads through the arrays below */
    batch_free(h->b);
    free(h->incs);
    free(h->cursor);
    free(h->bases);
    free(h->block_pages);
    free(h->claimed);
    free(h);
}

void *pyvmm_chain_read_new(int fd, const struct pyvmm_chain_increment *incs, unsigned nincs,
                           unsigned nblocks, void *const *bases, const pyvmm_u64 *block_pages,
                           pyvmm_u64 *const *claimed, pyvmm_u64 page_size,
                           const struct pyvmm_claim_options *options) {
    if (options->sieve_pages > PYVMM_CLAIM_MAX_SIEVE)
        return NULL;
    struct chain_read *h = calloc(1, sizeof *h);
    if (h == NULL)
        return NULL;
    h->fd = fd;
    h->nincs = nincs;
    h->nblocks = nblocks;
    h->page_size = page_size;
    h->options = *options;
    /* with a second reader, each thread checks the CRCs of the pages it reads (the second
     * core is taken): no checker thread */
    const int split = options->second_reader != 0; /* every other window to a second thread */
    if (split)
        h->options.check_thread = 0;
    h->incs = malloc((nincs ? nincs : 1) * sizeof *h->incs);
    h->cursor = calloc(nincs ? nincs : 1, sizeof *h->cursor);
    h->bases = malloc((nblocks ? nblocks : 1) * sizeof *h->bases);
    h->block_pages = malloc((nblocks ? nblocks : 1) * sizeof *h->block_pages);
    h->claimed = malloc((nblocks ? nblocks : 1) * sizeof *h->claimed);
    h->b = batch_new(&h->options, page_size);
    if (!h->incs || !h->cursor || !h->bases || !h->block_pages || !h->claimed || !h->b) {
        pyvmm_chain_read_free(h);
        return NULL;
    }
    memcpy(h->incs, incs, nincs * sizeof *incs);
    memcpy(h->bases, bases, nblocks * sizeof *bases);
    memcpy(h->block_pages, block_pages, nblocks * sizeof *block_pages);
    memcpy(h->claimed, claimed, nblocks * sizeof *claimed);
    if (split)
        h->second = second_new(h); /* none to be had: this thread reads every window */
    return h;
}

/* Increment k's records inside pages [w0, w1) of `block`: claimed, and the pages no newer
 * increment holds read into b (zero runs: checked against the CRCs); *cursor moves on. */
static int window_records(struct chain_read *h, unsigned k, pyvmm_u64 *cursor, struct batch *b,
                          pyvmm_u64 *pages_read, unsigned block, pyvmm_u64 w0, pyvmm_u64 w1,
                          struct pyvmm_page_read_error *err) {
    const struct pyvmm_chain_increment *inc = &h->incs[k];
    pyvmm_u64 i = *cursor;
    b->tag = k;
    for (; i < inc->nrecords; i++) {
        const struct pyvmm_index_record rec =
            pyvmm_index_record(inc->records + i * PYVMM_INDEX_RECORD);
        if (rec.block < block || (rec.block == block && rec.first + rec.npages <= w0))
            continue; /* wholly in windows the other reading thread took */
        if (rec.block != block || rec.first >= w1)
            break;
        const pyvmm_u64 end = rec.first + rec.npages;
        const pyvmm_u64 from = rec.first > w0 ? rec.first : w0, to = end < w1 ? end : w1;
        err->run = i;
        int rc = claim_pages(h->fd, b, h->claimed[block], block, h->bases[block], &rec, from,
                             to, &h->options, h->page_size, pages_read, err);
        if (rc)
            return rc;
        if (end > w1)
            break; /* the rest of the run is in the next window */
    }
    *cursor = i;
    return batch_flush(h->fd, b, err);
}

static void *second_main(void *arg) {
    struct second_reader *o = arg;
    pthread_mutex_lock(&o->t.lock);
    for (;;) {
        while (!o->queued && !o->t.stop)
            pthread_cond_wait(&o->t.wake, &o->t.lock);
        if (!o->queued)
            break;
        o->queued = 0;
        o->busy = 1;
        pthread_mutex_unlock(&o->t.lock);
        struct pyvmm_page_read_error err = {0};
        int rc = 0;
        unsigned k = o->h->nincs;
        while (!rc && k-- > 0)
            rc = window_records(o->h, k, &o->cursors[k], o->b, &o->pages_read, o->block, o->w0,
                                o->w1, &err);
        pthread_mutex_lock(&o->t.lock);
        if (rc && !o->rc) {
            o->rc = rc;
            o->err = err;
            o->failed = rc == PYVMM_CLAIM_BAD_CRC ? o->b->err_tag : k;
        }
        o->done_pages_read = o->pages_read;
        o->done_reads = o->b->preads;
        o->done_sieved = o->b->sieved;
        o->busy = 0;
        pthread_cond_signal(&o->t.done);
    }
    pthread_mutex_unlock(&o->t.lock);
    return NULL;
}

/* Waits until the second reader has nothing queued or running (lock held); its first error. */
static int second_wait(struct second_reader *o, struct pyvmm_page_read_error *err) {
    while (o->queued || o->busy)
        pthread_cond_wait(&o->t.done, &o->t.lock);
    if (o->rc)
        *err = o->err;
    return o->rc;
}

/* Hands window [w0, w1) of `block` to the second reader once it is free; 0, or an error it met. */
static int second_post(struct second_reader *o, unsigned block, pyvmm_u64 w0, pyvmm_u64 w1,
                       struct pyvmm_page_read_error *err) {
    pthread_mutex_lock(&o->t.lock);
    int rc = second_wait(o, err);
    if (!rc) {
        o->block = block;
        o->w0 = w0;
        o->w1 = w1;
        o->queued = 1;
        pthread_cond_signal(&o->t.wake);
    }
    pthread_mutex_unlock(&o->t.lock);
    return rc;
}

static int second_drain(struct second_reader *o, struct pyvmm_page_read_error *err) {
    pthread_mutex_lock(&o->t.lock);
    int rc = second_wait(o, err);
    pthread_mutex_unlock(&o->t.lock);
    return rc;
}

static void second_free(struct second_reader *o) {
    if (o == NULL)
        return;
    helper_stop(&o->t);
    batch_free(o->b);
    free(o->cursors);
    free(o);
}

/* NULL when no thread or batch can be had: then one thread reads all. */
static struct second_reader *second_new(struct chain_read *h) {
    struct second_reader *o = calloc(1, sizeof *o);
    if (o == NULL)
        return NULL;
    o->h = h;
    o->cursors = calloc(h->nincs ? h->nincs : 1, sizeof *o->cursors);
    if (o->cursors == NULL || (o->b = batch_new(&h->options, h->page_size)) == NULL) {
        free(o->cursors);
        free(o);
        return NULL;
    }
    if (helper_start(&o->t, second_main, o)) {
        batch_free(o->b);
        free(o->cursors);
        free(o);
        return NULL;
    }
    return o;
}

/* Increment k's cursor as the second reader will leave it after window [w0, w1) of `block` (this
 * thread finds the next window with it, without reading). */
static void skip_records(struct chain_read *h, unsigned k, unsigned block, pyvmm_u64 w1) {
    const struct pyvmm_chain_increment *inc = &h->incs[k];
    pyvmm_u64 i = h->cursor[k];
    for (; i < inc->nrecords; i++) {
        const struct pyvmm_index_record rec =
            pyvmm_index_record(inc->records + i * PYVMM_INDEX_RECORD);
        if (rec.block != block || rec.first >= w1 || rec.first + rec.npages > w1)
            break;
    }
    h->cursor[k] = i;
}

int pyvmm_chain_read_step(void *handle, pyvmm_u64 max_pages, struct pyvmm_chain_progress *out,
                          struct pyvmm_page_read_error *err) {
    struct chain_read *h = handle;
    pyvmm_u64 covered = 0;
    memset(err, 0, sizeof *err);
    while (h->block < h->nblocks && covered < max_pages) {
        const unsigned block = h->block;
        const pyvmm_u64 bpages = h->block_pages[block];
        /* the next window: from the first page a record of this block still lists */
        pyvmm_u64 next = bpages;
        for (unsigned k = 0; k < h->nincs; k++) {
            const struct pyvmm_chain_increment *inc = &h->incs[k];
            if (h->cursor[k] >= inc->nrecords)
                continue;
            const struct pyvmm_index_record rec =
                pyvmm_index_record(inc->records + h->cursor[k] * PYVMM_INDEX_RECORD);
            if (rec.block == block) {
                pyvmm_u64 at = rec.first > h->page ? rec.first : h->page;
                if (at < next)
                    next = at;
            }
        }
        if (next >= bpages) {
            covered += bpages - h->page;
            h->block++;
            h->page = 0;
            continue;
        }
        pyvmm_u64 w0 = next / WINDOW_PAGES * WINDOW_PAGES;
        if (w0 < h->page)
            w0 = h->page;
        pyvmm_u64 w1 = (next / WINDOW_PAGES + 1) * WINDOW_PAGES;
        if (w1 > bpages)
            w1 = bpages;
        h->turn ^= 1;
        if (h->second != NULL && h->turn) { /* every other window: the second reader's */
            int rc = second_post(h->second, block, w0, w1, err);
            if (rc) {
                out->failed = h->second->failed;
                return rc;
            }
            for (unsigned k = 0; k < h->nincs; k++)
                skip_records(h, k, block, w1);
        } else {
            for (unsigned k = h->nincs; k-- > 0;) {
                int rc = window_records(h, k, &h->cursor[k], h->b, &h->pages_read, block, w0,
                                        w1, err);
                if (rc) {
                    out->failed = rc == PYVMM_CLAIM_BAD_CRC ? h->b->err_tag : k;
                    return rc;
                }
            }
        }
        covered += w1 - h->page;
        h->page = w1;
    }
    h->covered += covered;
    if (h->block >= h->nblocks) {
        int rc = h->second != NULL ? second_drain(h->second, err) : 0;
        if (rc) {
            out->failed = h->second->failed;
            return rc;
        }
        rc = batch_finish(h->b, err);
        if (rc) {
            out->failed = h->b->err_tag;
            return rc;
        }
    }
    out->done = h->block >= h->nblocks;
    out->covered = h->covered;
    out->pages_read = h->pages_read;
    out->reads = h->b->preads;
    out->sieved_bytes = h->b->sieved;
    if (h->second != NULL) { /* the second reader's share, as of its last window */
        pthread_mutex_lock(&h->second->t.lock);
        out->pages_read += h->second->done_pages_read;
        out->reads += h->second->done_reads;
        out->sieved_bytes += h->second->done_sieved;
        pthread_mutex_unlock(&h->second->t.lock);
    }
    return 0;
}
