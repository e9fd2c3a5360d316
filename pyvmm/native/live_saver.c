/* The live checkpoint's saver in C (pyvmm_wp_session_save): writes every page a round selected,
 * as it was at the round's start, as QEMU RAM records, while the guest runs and its writes
 * fault: the shadow copies handlers queue (wp_fault.c) are written first whenever there are any,
 * the other pages are claimed and copied out of RAM. It never needs the GIL, so writers blocked
 * on a full pool wait for it instead of taking overflow slots (see struct wp_session).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/uio.h>
#include <unistd.h>

#include "wp_session.h"

#define SAVE_BATCH 64u  /* records per pwritev */
#define SAVE_POLL 16u   /* pages claimed from RAM between two looks at the shadow queue */
#define REC_PAGE 0x08u
#define REC_ZERO 0x02u
#define REC_CONTINUE 0x20u

struct saver {
    struct wp_session *s;
    const struct pyvmm_live_block *blocks;
    int fd;
    u64 offset;  /* file offset of the next batch */
    u64 pending; /* bytes in the batch */
    int last_block;
    struct iovec iov[2 * SAVE_BATCH];
    unsigned niov, nrec, ncopy, nslots;
    unsigned char hdr[SAVE_BATCH][8 + 1 + 255 + 1];
    unsigned char *copy; /* SAVE_BATCH pages copied out of RAM */
    unsigned slots[SAVE_BATCH];
    struct pyvmm_page_encoder *enc;   /* NULL: pages are written plain */
    unsigned char (*packed)[2 + PYVMM_COMPRESSED_MAX]; /* with enc: be16 n + frame, a record each */
    struct pyvmm_live_run *runs;
    u64 max_runs;
    struct pyvmm_live_save_stats *st;
    int open_saved;
    unsigned open_block;
    u64 open_start, open_end; /* pages claimed from RAM, to unprotect (empty when equal) */
};

/* Unprotect the run of pages the saver claimed (open_saved): later writes to them need no
 * fault.  Their dirty bits are set first, under wp_lock, as for a handler's unprotect. */
static int saver_open(struct saver *sv) {
    if (sv->open_end == sv->open_start)
        return 0;
    struct wp_session *s = sv->s;
    struct wp_block *b = &s->blocks[sv->open_block];
    pthread_mutex_lock(&s->wp_lock);
    pyvmm_bitmap_set_range(b->dirty, sv->open_start, sv->open_end - sv->open_start);
    int rc = pyvmm_uffd_writeprotect(s->uffd, b->base + sv->open_start * PAGE_SZ,
                                     (sv->open_end - sv->open_start) * PAGE_SZ, 0);
    pthread_mutex_unlock(&s->wp_lock);
    sv->open_start = sv->open_end = 0;
    return rc == -EAGAIN ? 0 : rc;
}

static int is_zero_page(const void *data) {
    const u64 *w = data;
    for (unsigned i = 0; i < PAGE_SZ / 8; i++)
        if (w[i])
            return 0;
    return 1;
}

static int saver_flush(struct saver *sv) {
    struct iovec *iov = sv->iov;
    unsigned n = sv->niov;
    u64 off = sv->offset;
    while (n) {
        ssize_t got = pwritev(sv->fd, iov, (int)n, (off_t)off);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (got == 0)
            return -EIO;
        off += (u64)got;
        sv->st->bytes_written += (u64)got;
        while (n && (u64)got >= iov->iov_len) {
            got -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n) {
            iov->iov_base = (char *)iov->iov_base + got;
            iov->iov_len -= (size_t)got;
        }
    }
    sv->offset = off;
    sv->pending = 0;
    pyvmm_wp_release_slots(sv->s, sv->slots, sv->nslots);
    sv->niov = sv->nrec = sv->ncopy = sv->nslots = 0;
    return 0;
}

static int saver_add_run(struct saver *sv, unsigned block, u64 page, u64 data_offset, int kind,
                         int cont) {
    struct pyvmm_live_save_stats *st = sv->st;
    if (st->nruns) {
        /* the last run holds the record written just before this one, so a compressed record
         * of the next page follows it in the file; a data run's stride is checked all the same */
        struct pyvmm_live_run *r = &sv->runs[st->nruns - 1];
        if (cont && r->block == block && r->first_page + r->npages == page && r->kind == kind &&
            (kind != PYVMM_RUN_DATA || r->data_offset + r->npages * (8 + PAGE_SZ) == data_offset)) {
            r->npages++;
            return 0;
        }
    }
    if (st->nruns >= sv->max_runs)
        return -EOVERFLOW;
    sv->runs[st->nruns++] = (struct pyvmm_live_run){block, kind, page, 1, data_offset};
    return 0;
}

/* Append the record of `page` of `block` (4 KiB at `data`, in the copy buffer or a shadow slot
 * that is released once written: slot >= 0). */
static int saver_record(struct saver *sv, unsigned block, u64 page, const void *data, int slot) {
    int zero = is_zero_page(data);
    unsigned char *packed = sv->enc ? sv->packed[sv->nrec] : NULL;
    size_t n = packed && !zero ? pyvmm_encoder_compress(sv->enc, data, packed + 2) : 0;
    int kind = zero ? PYVMM_RUN_ZERO : n ? PYVMM_RUN_COMPRESSED : PYVMM_RUN_DATA;
    unsigned char *h = sv->hdr[sv->nrec];
    int cont = (int)block == sv->last_block;
    u64 flags = zero ? REC_ZERO : n ? PYVMM_REC_COMPRESSED : REC_PAGE;
    u64 header = page * PAGE_SZ | flags | (cont ? REC_CONTINUE : 0);
    for (int i = 0; i < 8; i++)
        h[i] = (unsigned char)(header >> (56 - 8 * i));
    size_t hlen = 8;
    if (!cont) {
        const struct pyvmm_live_block *lb = &sv->blocks[block];
        h[8] = (unsigned char)lb->idstr_len;
        memcpy(h + 9, lb->idstr, lb->idstr_len);
        hlen = 9 + lb->idstr_len;
        sv->last_block = (int)block;
    }
    if (zero)
        h[hlen++] = 0;
    sv->iov[sv->niov++] = (struct iovec){h, hlen};
    u64 data_offset = zero ? 0 : sv->offset + sv->pending + hlen;
    sv->pending += hlen;
    if (n) {
        packed[0] = (unsigned char)(n >> 8);
        packed[1] = (unsigned char)n;
        sv->iov[sv->niov++] = (struct iovec){packed, 2 + n};
        sv->pending += 2 + n;
        sv->st->data_pages++;
        sv->st->compressed_pages++;
        sv->st->compressed_bytes += n;
    } else if (!zero) {
        sv->iov[sv->niov++] = (struct iovec){(void *)data, PAGE_SZ};
        sv->pending += PAGE_SZ;
        sv->st->data_pages++;
    } else {
        sv->st->zero_pages++;
    }
    if (slot >= 0) {
        sv->slots[sv->nslots++] = (unsigned)slot;
        sv->st->from_shadow++;
    }
    sv->nrec++;
    int rc = saver_add_run(sv, block, page, data_offset, kind, cont);
    if (rc)
        return rc;
    return sv->nrec == SAVE_BATCH ? saver_flush(sv) : 0;
}

/* Write every queued shadow copy; their slots go back to the pool right away. */
static int saver_drain(struct saver *sv) {
    struct wp_session *s = sv->s;
    if (!__atomic_load_n(&s->q_len, __ATOMIC_ACQUIRE))
        return 0;
    unsigned blocks[SAVE_BATCH], slots[SAVE_BATCH];
    u64 pages[SAVE_BATCH];
    int got = 0;
    unsigned n;
    while ((n = pyvmm_wp_pop_shadows(s, blocks, pages, slots, SAVE_BATCH))) {
        got = 1;
        for (unsigned i = 0; i < n; i++) {
            int rc = saver_record(sv, blocks[i], pages[i],
                                  pyvmm_wp_session_slot_addr(s, slots[i]), (int)slots[i]);
            if (rc) { /* this one is in the batch already (released with it); the rest not */
                pyvmm_wp_release_slots(s, slots + i + 1, n - i - 1);
                return rc;
            }
        }
    }
    /* a waiting writer gets its slot back now, not after the next full batch */
    return got && sv->nslots ? saver_flush(sv) : 0;
}

static int save_body(struct wp_session *s, int fd, u64 offset,
                     const struct pyvmm_live_block *blocks, struct pyvmm_live_run *runs,
                     u64 max_runs, int open_saved, int level,
                     struct pyvmm_live_save_stats *stats) {
    memset(stats, 0, sizeof *stats);
    if (level != 0 && !pyvmm_level_valid(level))
        return -EINVAL;
    struct saver *sv = calloc(1, sizeof *sv);
    if (!sv)
        return -ENOMEM;
    unsigned char *copy = NULL;
    struct pyvmm_page_encoder *enc = level ? pyvmm_encoder_new(level) : NULL;
    void *packed = level ? malloc(SAVE_BATCH * sizeof *sv->packed) : NULL;
    if (posix_memalign((void **)&copy, PAGE_SZ, (size_t)SAVE_BATCH * PAGE_SZ) ||
        (level && (!enc || !packed))) {
        free(copy);
        free(packed);
        pyvmm_encoder_free(enc);
        free(sv);
        return -ENOMEM;
    }
    *sv = (struct saver){.s = s, .blocks = blocks, .fd = fd, .offset = offset, .last_block = -1,
                         .copy = copy, .enc = enc, .packed = packed, .runs = runs,
                         .max_runs = max_runs, .st = stats, .open_saved = open_saved};
    pthread_mutex_lock(&s->lock);
    s->saver_active = 1;
    pthread_mutex_unlock(&s->lock);
    int rc = 0;
    for (unsigned bi = 0; bi < s->nblocks && !rc; bi++) {
        const u64 *select = blocks[bi].select;
        struct wp_block *b = &s->blocks[bi];
        if (!select)
            continue;
        unsigned since_poll = 0;
        for (u64 p = 0; p < b->npages && !rc;) {
            u64 word = select[p / 64] >> (p % 64);
            if (!word) {
                p = (p / 64 + 1) * 64;
                continue;
            }
            if (!(word & 1)) {
                p += (u64)__builtin_ctzll(word);
                continue;
            }
            if (++since_poll == SAVE_POLL) {
                since_poll = 0;
                if ((rc = saver_drain(sv)))
                    break;
            }
            unsigned char *st = &s->state[b->first + p];
            unsigned char expect = ST_NONE;
            if (__atomic_compare_exchange_n(st, &expect, ST_PROCESSING, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST)) {
                unsigned char *dst = sv->copy + (size_t)sv->ncopy++ * PAGE_SZ;
                memcpy(dst, (void *)(uintptr_t)(b->base + p * PAGE_SZ), PAGE_SZ);
                __atomic_store_n(st, ST_SENT, __ATOMIC_RELEASE);
                if (sv->open_saved) {
                    /* runs end at 2 MiB boundaries: a whole transparent huge page unprotected
                     * at once stays huge (and one ioctl, one TLB flush per 512 pages) */
                    if (sv->open_end != p || sv->open_block != bi || p % HUGE_PAGES == 0) {
                        if ((rc = saver_open(sv)))
                            break;
                        sv->open_block = bi;
                        sv->open_start = p;
                    }
                    sv->open_end = p + 1;
                }
                rc = saver_record(sv, bi, p, dst, -1);
            }
            p++;
        }
        if (!rc)
            rc = saver_open(sv);
    }
    /* pages a handler claimed before the pass reached them are still on their way */
    while (!rc) {
        u64 busy = __atomic_load_n(&s->inflight, __ATOMIC_SEQ_CST);
        if ((rc = saver_drain(sv)))
            break;
        if (!busy && !__atomic_load_n(&s->q_len, __ATOMIC_SEQ_CST))
            break;
        if (busy)
            sched_yield();
    }
    if (!rc)
        rc = saver_flush(sv);
    if (rc) /* copies taken but not written: their slots go back (the round is abandoned) */
        pyvmm_wp_release_slots(s, sv->slots, sv->nslots);
    pthread_mutex_lock(&s->lock);
    s->saver_active = 0;
    pthread_cond_broadcast(&s->slot_freed); /* waiters go on with overflow slots */
    pthread_mutex_unlock(&s->lock);
    free(sv->copy);
    free(sv->packed);
    pyvmm_encoder_free(sv->enc);
    free(sv);
    return rc;
}

struct save_call {
    struct wp_session *s;
    int fd, open_saved, level, nice, rc;
    u64 offset, max_runs;
    const struct pyvmm_live_block *blocks;
    struct pyvmm_live_run *runs;
    struct pyvmm_live_save_stats *stats;
};

static void *save_thread(void *arg) {
    struct save_call *c = arg;
    pthread_setname_np(pthread_self(), "pyvmm-saver");
    setpriority(PRIO_PROCESS, 0, c->nice); /* Linux: this thread's nice value only */
    c->rc = save_body(c->s, c->fd, c->offset, c->blocks, c->runs, c->max_runs, c->open_saved,
                      c->level, c->stats);
    return NULL;
}

int pyvmm_wp_session_save(void *handle, int fd, pyvmm_u64 offset,
                          const struct pyvmm_live_block *blocks, struct pyvmm_live_run *runs,
                          pyvmm_u64 max_runs, int open_saved, int level,
                          struct pyvmm_live_save_stats *stats) {
    struct wp_session *s = handle;
    int nice = __atomic_load_n(&s->saver_nice, __ATOMIC_RELAXED);
    if (nice <= 0)
        return save_body(s, fd, offset, blocks, runs, max_runs, open_saved, level, stats);
    /* a thread of its own, so that the caller's priority need not be raised back afterwards
     * (which takes a privilege) */
    struct save_call call = {s,      fd,       open_saved, level, nice, 0,
                             offset, max_runs, blocks,     runs,  stats};
    pthread_t thread;
    int rc = pthread_create(&thread, NULL, save_thread, &call);
    if (rc)
        return save_body(s, fd, offset, blocks, runs, max_runs, open_saved, level, stats);
    pthread_join(thread, NULL);
    return call.rc;
}

int pyvmm_wp_session_set_saver_nice(void *handle, int nice) {
    struct wp_session *s = handle;
    if (nice < 0 || nice > 19)
        return -EINVAL;
    __atomic_store_n(&s->saver_nice, nice, __ATOMIC_RELAXED);
    return 0;
}
