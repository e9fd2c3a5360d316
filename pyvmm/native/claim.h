/* An increment's page index claimed and read into RAM: what the per-increment reader
 * (indexed.c) shares with the whole-chain reader (chain_read.c). Not fed to cffi; the API for
 * Python is in native.h.
 */
#ifndef PYVMM_CLAIM_H
#define PYVMM_CLAIM_H

#include <pthread.h>
#include <sys/uio.h>

#include "internal.h"

#define BATCH_IOV 1024 /* IOV_MAX on Linux */
#define CHECKED_BATCH_IOV 256 /* with CRC checks: 128 pages, 512 KiB, checked while cached */

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

/* A helper thread's lifetime: started with its lock and two condition variables (`wake` for
 * it, `done` for whoever waits on it); stopped by setting `stop`, waking it, and joining it. */
struct helper {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t wake, done;
    int stop;
};

/* indexed.c */
PYVMM_HIDDEN int pyvmm_helper_start(struct helper *t, void *(*run)(void *), void *arg); /* 0/-1 */
PYVMM_HIDDEN void pyvmm_helper_stop(struct helper *t);
/* A batch for pyvmm_claim_pages (NULL: out of memory); options must outlive it. */
PYVMM_HIDDEN struct batch *pyvmm_batch_new(const struct pyvmm_claim_options *options,
                                           pyvmm_u64 page_size);
/* The batch read (preadv) and checked (headers, CRCs) and emptied: 0 or the error. */
PYVMM_HIDDEN int pyvmm_batch_flush(int fd, struct batch *b, struct pyvmm_page_read_error *err);
/* The checker's last job: 0 or its error. Call before the batch is freed, once all is read. */
PYVMM_HIDDEN int pyvmm_batch_finish(struct batch *b, struct pyvmm_page_read_error *err);
PYVMM_HIDDEN void pyvmm_batch_free(struct batch *b);
/* Pages [from, to) of record `rec` (of `block`, RAM at `base`) claimed in bits, those a newer
 * increment does not hold queued to be read into b (*pages_read counts them). */
PYVMM_HIDDEN int pyvmm_claim_pages(int fd, struct batch *b, pyvmm_u64 *bits, unsigned block,
                                   void *base, const struct pyvmm_index_record *rec,
                                   pyvmm_u64 from, pyvmm_u64 to,
                                   const struct pyvmm_claim_options *options,
                                   pyvmm_u64 page_size, pyvmm_u64 *pages_read,
                                   struct pyvmm_page_read_error *err);
/* The checks every record gets before any of its pages is claimed: 0 or the error. */
PYVMM_HIDDEN int pyvmm_check_index_record(const struct pyvmm_index_record *rec, unsigned nblocks,
                                          const pyvmm_u64 *block_pages, pyvmm_u64 page_size,
                                          pyvmm_u64 stream_start, pyvmm_u64 stream_end,
                                          struct pyvmm_page_read_error *err);

#endif
