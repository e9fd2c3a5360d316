/* The indexed reload of a whole chain at once (pyvmm.migration.reload), window by window through
 * RAM and newest-first through the increments inside each window, each window's claims and reads
 * done with the per-increment reader's batches (indexed.c, claim.h).
 *
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
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "claim.h"

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
            int bad = pyvmm_check_index_record(&rec, nblocks, block_pages, page_size,
                                               inc->stream_start, inc->stream_end, err);
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
    pyvmm_batch_free(h->b);
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
    h->b = pyvmm_batch_new(&h->options, page_size);
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
        int rc = pyvmm_claim_pages(h->fd, b, h->claimed[block], block, h->bases[block], &rec,
                                   from, to, &h->options, h->page_size, pages_read, err);
        if (rc)
            return rc;
        if (end > w1)
            break; /* the rest of the run is in the next window */
    }
    *cursor = i;
    return pyvmm_batch_flush(h->fd, b, err);
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
    pyvmm_helper_stop(&o->t);
    pyvmm_batch_free(o->b);
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
    if (o->cursors == NULL || (o->b = pyvmm_batch_new(&h->options, h->page_size)) == NULL) {
        free(o->cursors);
        free(o);
        return NULL;
    }
    if (pyvmm_helper_start(&o->t, second_main, o)) {
        pyvmm_batch_free(o->b);
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
        rc = pyvmm_batch_finish(h->b, err);
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
