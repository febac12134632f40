/* The kernels' thread pool: tm_parallel(ntasks, fn, ctx, nthreads) runs fn(ctx, i) for every task
 * i in [0, ntasks), on the calling thread and up to nthreads - 1 workers.
 *
 * Why not OpenMP: an OpenMP parallel region ends at a barrier that waits for every thread of the
 * team, so when the cores are shared with other work and one thread is not scheduled, the call
 * waits a whole time slice (milliseconds) for a thread that may have no work left to do. Here
 * tasks are claimed one at a time from a shared counter, the caller claims too, and it waits only
 * for tasks already claimed: a worker that wakes late finds nothing left and goes back to waiting.
 *
 * Invariants:
 *   ticket = (generation << 44) | (ntasks << 22) | next   (22 bits each: at most 4M tasks a call)
 *   A task is claimed by a compare-and-swap of ticket from (g, n, i) to (g, n, i + 1) with i < n, so
 *   a claim is always of the current call; job (fn, ctx) is read after the claim, and the caller
 *   rewrites it only after every claimed task of the call is done (done == ntasks), so a claim
 *   never pairs one call's counter with another call's function.
 *   One call at a time: a second thread that calls while one runs does its tasks alone.
 * Workers spin for SPIN_ROUNDS pauses after a call, then sleep on a futex until the next one.
 */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "tm_cpu.h"

#define MAX_WORKERS 63
#define FIELD_BITS 22
#define FIELD_MASK ((UINT64_C(1) << FIELD_BITS) - 1)
#define SPIN_ROUNDS 4000  /* a worker's pauses after a call before it sleeps (~100 us; calls come every ~20 us) */

static struct {
    void (*fn)(void *, int64_t);
    void *ctx;
} job;
static _Atomic uint64_t ticket;
static _Atomic int64_t done;
static _Atomic uint32_t generation;  /* the futex word: bumped by every call that wants workers */
static _Atomic int wanted;           /* workers [0, wanted) take part in the current call */
static _Atomic int sleepers;
static int nworkers;
static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER;

static inline uint64_t pack(uint64_t gen, uint64_t n, uint64_t next) {
    return ((gen & FIELD_MASK) << (2 * FIELD_BITS)) | (n << FIELD_BITS) | next;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Claim and run tasks of the call whose ticket generation is gen until none is left. */
static void run_claims(uint64_t gen) {
    for (;;) {
        uint64_t s = atomic_load_explicit(&ticket, memory_order_acquire);
        const uint64_t n = (s >> FIELD_BITS) & FIELD_MASK, next = s & FIELD_MASK;
        if ((s >> (2 * FIELD_BITS)) != (gen & FIELD_MASK) || next >= n) return;
        if (!atomic_compare_exchange_weak_explicit(&ticket, &s, s + 1, memory_order_acq_rel, memory_order_relaxed))
            continue;
        job.fn(job.ctx, (int64_t)next);
        atomic_fetch_add_explicit(&done, 1, memory_order_release);
    }
}

static void *worker_main(void *arg) {
    const int index = (int)(intptr_t)arg;
    uint32_t seen = atomic_load(&generation);
    for (;;) {
        for (int i = 0; i < SPIN_ROUNDS && atomic_load_explicit(&generation, memory_order_acquire) == seen; i++)
            cpu_relax();
        while (atomic_load_explicit(&generation, memory_order_acquire) == seen) {
            atomic_fetch_add(&sleepers, 1);
            if (atomic_load(&generation) == seen) syscall(SYS_futex, &generation, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
            atomic_fetch_sub(&sleepers, 1);
        }
        seen = atomic_load_explicit(&generation, memory_order_acquire);
        if (index < atomic_load(&wanted)) run_claims(seen);
    }
    return NULL;
}

static void ensure_workers(int count) {
    while (nworkers < count && nworkers < MAX_WORKERS) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, worker_main, (void *)(intptr_t)nworkers) != 0) return;
        pthread_detach(thread);
        nworkers++;
    }
}

void tm_parallel(int64_t ntasks, void (*fn)(void *, int64_t), void *ctx, int nthreads) {
    if (ntasks <= 0) return;
    if (nthreads <= 1 || ntasks == 1 || (uint64_t)ntasks > FIELD_MASK || pthread_mutex_trylock(&call_lock) != 0) {
        for (int64_t i = 0; i < ntasks; i++) fn(ctx, i);
        return;
    }
    ensure_workers(nthreads - 1);
    job.fn = fn;
    job.ctx = ctx;
    atomic_store_explicit(&done, 0, memory_order_relaxed);
    atomic_store(&wanted, nthreads - 1 < nworkers ? nthreads - 1 : nworkers);
    const uint32_t gen = atomic_load(&generation) + 1;
    atomic_store_explicit(&ticket, pack(gen, (uint64_t)ntasks, 0), memory_order_release);
    atomic_store_explicit(&generation, gen, memory_order_release);
    if (atomic_load(&sleepers) > 0) syscall(SYS_futex, &generation, FUTEX_WAKE_PRIVATE, MAX_WORKERS, NULL, NULL, 0);
    run_claims(gen);
    /* only tasks a worker has claimed can remain: wait for them, yielding the core now and then in
     * case that worker is waiting for it */
    for (int spins = 0; atomic_load_explicit(&done, memory_order_acquire) < ntasks; spins++) {
        if (spins % 256 == 255) sched_yield(); else cpu_relax();
    }
    pthread_mutex_unlock(&call_lock);
}
