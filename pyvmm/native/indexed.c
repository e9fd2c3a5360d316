/* The indexed reload's inner loop (pyvmm.migration.reload): one increment's page index, as the
 * raw big-endian records of the file, claimed newest-first against per-block bitmaps and the
 * pages no newer increment holds read straight into guest RAM. Python runs once per increment,
 * never per run: with scattered writes an index holds a run per page.
 *
 * With checksums, each page read is compared with the CRC-32C the file's checksum table expects
 * right after its batch is read (small batches then, so the pages are still in the cache), and
 * every page left zero (zero runs, pages no increment holds) must expect a zero page: the
 * reloaded RAM is checked without a second pass over it.
 *
 * The whole chain at once, window by window through RAM, is chain_read.c, on the same batches
 * and claims (claim.h). */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "claim.h"

#define STRIDE_HEADER 8
#define PAGE_FLAGS_CONTINUE_PAGE 0x28

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


int pyvmm_helper_start(struct helper *t, void *(*run)(void *), void *arg) {
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

void pyvmm_helper_stop(struct helper *t) {
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
    if (pyvmm_helper_start(&c->t, checker_main, c)) {
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
    pyvmm_helper_stop(&c->t);
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

int pyvmm_batch_flush(int fd, struct batch *b, struct pyvmm_page_read_error *err) {
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
        int rc = pyvmm_batch_flush(fd, b, err);
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
struct batch *pyvmm_batch_new(const struct pyvmm_claim_options *options,
                              pyvmm_u64 page_size) {
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
int pyvmm_batch_finish(struct batch *b, struct pyvmm_page_read_error *err) {
    return b->checker != NULL ? checker_drain(b->checker, err, &b->err_tag) : 0;
}

void pyvmm_batch_free(struct batch *b) {
    if (b != NULL) {
        checker_free(b->checker);
        free(b->scratch);
    }
    free(b);
}

/* Pages [from, to) of record `rec` (of `block`, RAM at `base`): a zero run's are checked
 * against the CRCs, a data run's not claimed yet are queued to be read (*pages_read counts
 * them); then all are claimed. */
int pyvmm_claim_pages(int fd, struct batch *b, pyvmm_u64 *bits, unsigned block, void *base,
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
int pyvmm_check_index_record(const struct pyvmm_index_record *rec, unsigned nblocks,
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
    struct batch *b = pyvmm_batch_new(options, page_size);
    struct pyvmm_inflater in;
    if (b == NULL || pyvmm_inflater_init(&in, fd, stream_end) != 0) {
        pyvmm_batch_free(b);
        return -ENOMEM;
    }
    b->inflater = &in;
    int rc = claim_read(fd, records, nrecords, nblocks, bases, block_pages, claimed, page_size,
                        stream_start, stream_end, options, result, err, b);
    result->sieved_bytes = b->sieved;
    result->reads += in.reads;
    pyvmm_inflater_free(&in);
    pyvmm_batch_free(b);
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
        int rc = pyvmm_check_index_record(&rec, nblocks, block_pages, page_size, stream_start,
                                          stream_end, err);
        if (rc)
            return rc;
        if (rec.flags & PYVMM_INDEX_ZERO)
            result->zero_pages += rec.npages;
        else
            result->data_pages += rec.npages;
        rc = pyvmm_claim_pages(fd, b, claimed[rec.block], rec.block, bases[rec.block], &rec,
                               rec.first, rec.first + rec.npages, options, page_size,
                               &result->pages_read, err);
        if (rc)
            return rc;
    }
    int rc = pyvmm_batch_flush(fd, b, err);
    if (rc == 0)
        rc = pyvmm_batch_finish(b, err);
    result->reads = b->preads;
    return rc;
}
