/* The vCPU's stop gate (pyvmm.vcpu_gate): asynchronous pauses served at a translation block's
 * first instruction, on the vCPU thread.
 *
 * Why not uc_emu_stop from the pausing thread: unicorn 2.1 leaves a TB chain at the next block
 * start and restores the guest PC to that block's address only when no stop was requested
 * (cpu_tb_exec: "avoid sync twice when helper_uc_tracecode() already did this"). Without a code
 * hook nothing did: PC keeps the value last written, an instruction the guest already ran some
 * blocks earlier, and resuming from it runs those instructions twice (issue 13). A block hook is
 * entered with PC synced to the block's address; stopping from inside it stops exactly there. */
#include "native.h"

void pyvmm_vcpu_block_hook(void *uc, pyvmm_u64 address, unsigned int size, void *user_data) {
    struct pyvmm_vcpu_gate *gate = user_data;
    /* the run summary's instruction count, free here: a block left early (an exception in its
     * middle) counts whole, a stop lands before the block and counts nothing of it */
    gate->insns += size >> 2;
    if (!__atomic_load_n(&gate->requested, __ATOMIC_ACQUIRE))
        return;
    __atomic_store_n(&gate->requested, 0, __ATOMIC_RELAXED);
    gate->stopped_at = address;
    gate->stops++;
    gate->emu_stop(uc);
}
