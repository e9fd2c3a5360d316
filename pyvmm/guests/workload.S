// pyvmm built-in default workload: a bare-metal ARM64 program that dirties guest RAM at a tunable rate.
//
// Assembled at load time by keystone (pyvmm/guests/workload.py), so this file sticks to what keystone
// accepts: `//` comments, named labels (no numeric `1:` labels), `.equ`, one `.macro`, `.asciz`.
//
// Machine contract: loaded at RAM base and entered at its first byte at EL1, MMU off, physical
// addresses. No counters, no host state: the run is a pure function of the entry registers.
//
// Entry registers (set by workload.py's build_workload):
//   x0  working-set base address (page aligned; the stack grows down from here, below the set)
//   x1  working-set size in 4 KiB pages (>= 1)
//   x2  pattern id: 0 loop, 1 sequential, 2 random, 3 hotcold, 4 increment
//   x3  passes (0 = run forever)
//   x4  64-bit seed of the PRNG (xorshift64*)
//   x5  bytes written per page touch: a multiple of 8 in 8..4096
//   x6  hot-set size in percent of the working set (1..100), hotcold only
//   x7  print a progress line every N passes (0 = no progress lines)
//   x8  chance in percent (0..100) that a hotcold touch goes to the hot set
//   x9  ask the host for a checkpoint after every N passes (0 = never), through the guest-inform
//       device (pyvmm/devices/guest_inform.py): write the request, poll until it is answered
//
// A touch of page i in pass p (0-based) stores touch/8 words at the start of the page; word at byte
// offset o holds ((p + 1) << 48) | (i << 12) | o, so every pass writes new content.
// "increment" instead adds 1 to the first byte of every page in turn (DESIGN.md section 9).
// "loop" touches no memory: each pass runs pages*touch/8 iterations of a PRNG step, summing the states.
//
// UART output (PL011 data register), one line each:
//   pyvmm-workload: start pattern=NAME pages=N passes=P touch=T
//   pyvmm-workload: pass K/P pattern=NAME pages=N        (P printed as "forever" when passes=0)
//   pyvmm-workload: checkpoint after pass K              (then the request; after any pass line)
//   pyvmm-workload: done passes=P checksum=0x%016x
// The checksum is, for "loop", the sum of the PRNG states; otherwise a polynomial hash over every
// 64-bit word of the working set, h = h * 0x100000001b3 + word (mod 2**64), from h = 0.
// Then PSCI SYSTEM_OFF through `hvc #0`. Bad entry registers print "pyvmm-workload: bad parameters".
// A checkpoint request changes nothing else: whether the host answers done or failed, and after
// however many polls, the run goes on the same (only its instruction count differs).
//
// Registers held for the whole run:
//   x19 base, x20 pages, x21 pattern, x22 passes, x23 PRNG state, x24 touch bytes,
//   x25 hot pages, x26 report interval, x27 passes completed, x28 hot chance,
//   x29 checkpoint interval (print_dec saves and restores it with x30),
//   x18 loop accumulator / checksum (bare metal: no platform ABI claims x18).
// Print routines clobber x0-x7 only; pass routines clobber x8-x17 only.

.equ UART_BASE_HI, 0x0900          // PL011 at 0x09000000 (loaded as 0x0900 << 16)
.equ UART_FR, 0x18                 // flag register
.equ PAGE_SIZE, 4096              // shift amounts below are written as #12: keystone wants literal shifts
.equ PATTERN_LOOP, 0
.equ PATTERN_SEQUENTIAL, 1
.equ PATTERN_RANDOM, 2
.equ PATTERN_HOTCOLD, 3
.equ PATTERN_INCREMENT, 4
.equ INFORM_BASE_HI, 0x090f        // guest-inform device at 0x090f0000
.equ INFORM_REQUEST, 0x14
.equ INFORM_REQUEST_STATUS, 0x20
.equ REQUEST_CHECKPOINT, 1
.equ STATUS_PENDING, 1
.equ POLL_DELAY, 16384             // loop steps between two polls: each poll is a host call

// One xorshift64* state step on \s (the multiply that makes the output is left to the caller, since
// the loop pattern wants the state itself). Open-coded as a macro: it sits in the hottest loops.
.macro xorshift s
    eor \s, \s, \s, lsr #12
    eor \s, \s, \s, lsl #25
    eor \s, \s, \s, lsr #27
.endm

_start:
    mov sp, x0                     // stack below the working set: the gap after the image is free
    mov x19, x0
    mov x20, x1
    mov x21, x2
    mov x22, x3
    mov x24, x5
    mov x26, x7
    mov x28, x8
    mov x29, x9
    mov x27, #0
    mov x18, #0

    // Refuse parameters the pass routines cannot honour rather than scribble over the image.
    cbz x20, bad_parameters
    cmp x21, #PATTERN_INCREMENT
    b.hi bad_parameters
    cbz x24, bad_parameters
    cmp x24, #4096
    b.hi bad_parameters
    tst x24, #7
    b.ne bad_parameters
    cmp x28, #100
    b.hi bad_parameters
    cmp x6, #100
    b.hi bad_parameters

    // Hot pages = max(1, pages * hot% / 100); the rest is cold (possibly none).
    mul x9, x20, x6
    mov x10, #100
    udiv x25, x9, x10
    cmp x25, #0
    csinc x25, x25, xzr, ne

    // Seed the PRNG; xorshift must never hold 0, so the seed is mixed and 0 mapped to 1.
    movz x9, #0x7c15
    movk x9, #0x7f4a, lsl #16
    movk x9, #0x79b9, lsl #32
    movk x9, #0x9e37, lsl #48
    eor x23, x4, x9
    cmp x23, #0
    csinc x23, x23, xzr, ne

    adr x0, msg_start
    bl puts
    bl print_pattern
    adr x0, msg_pages
    bl puts
    mov x0, x20
    bl print_dec
    adr x0, msg_passes
    bl puts
    bl print_passes
    adr x0, msg_touch
    bl puts
    mov x0, x24
    bl print_dec
    mov x0, #10
    bl putc

pass_loop:
    cbz x22, pass_run              // passes = 0: forever
    cmp x27, x22
    b.hs finish
pass_run:
    // Tag of this pass: (p + 1) << 48, so each pass writes words no earlier pass wrote.
    add x13, x27, #1
    lsl x13, x13, #48
    cmp x21, #PATTERN_SEQUENTIAL
    b.eq run_sequential
    cmp x21, #PATTERN_RANDOM
    b.eq run_random
    cmp x21, #PATTERN_HOTCOLD
    b.eq run_hotcold
    cmp x21, #PATTERN_INCREMENT
    b.eq run_increment
    bl pass_loop_only
    b pass_done
run_sequential:
    bl pass_sequential
    b pass_done
run_random:
    bl pass_random
    b pass_done
run_hotcold:
    bl pass_hotcold
    b pass_done
run_increment:
    bl pass_increment
pass_done:
    add x27, x27, #1
    cbz x26, pass_checkpoint
    udiv x9, x27, x26
    msub x9, x9, x26, x27          // passes completed mod report interval
    cbnz x9, pass_checkpoint
    adr x0, msg_pass
    bl puts
    mov x0, x27
    bl print_dec
    mov x0, #47                    // '/'
    bl putc
    bl print_passes
    adr x0, msg_pattern
    bl puts
    bl print_pattern
    adr x0, msg_pages
    bl puts
    mov x0, x20
    bl print_dec
    mov x0, #10
    bl putc
pass_checkpoint:
    cbz x29, pass_loop
    udiv x9, x27, x29
    msub x9, x9, x29, x27          // passes completed mod checkpoint interval
    cbnz x9, pass_loop
    bl request_checkpoint
    b pass_loop

finish:
    cmp x21, #PATTERN_LOOP
    b.eq finish_print
    // Polynomial hash of the whole working set, two words per iteration to halve the loop overhead.
    movz x9, #0x01b3
    movk x9, #0x0100, lsl #32      // 0x100000001b3 (the FNV-64 prime)
    mov x18, #0
    mov x10, x19
    add x11, x19, x20, lsl #12
checksum_loop:
    ldp x12, x13, [x10], #16
    madd x18, x18, x9, x12
    madd x18, x18, x9, x13
    cmp x10, x11
    b.lo checksum_loop
finish_print:
    adr x0, msg_done
    bl puts
    mov x0, x27
    bl print_dec
    adr x0, msg_checksum
    bl puts
    mov x0, x18
    bl print_hex
    mov x0, #10
    bl putc
system_off:
    movz x0, #0x0008
    movk x0, #0x8400, lsl #16      // PSCI SYSTEM_OFF (0x84000008)
    hvc #0
    b system_off                   // a machine that returns from SYSTEM_OFF gets asked again

bad_parameters:
    adr x0, msg_bad
    bl puts
    b system_off

// pass_loop_only: pages * touch/8 PRNG steps, summed into x18; no memory touched.
pass_loop_only:
    lsr x8, x24, #3
    mul x8, x8, x20
loop_only_step:
    xorshift x23
    add x18, x18, x23
    subs x8, x8, #1
    b.ne loop_only_step
    ret

// pass_sequential: touch pages 0..pages-1 in order.
pass_sequential:
    mov x17, x30
    mov x9, #0
sequential_step:
    mov x10, x9
    bl touch_page
    add x9, x9, #1
    cmp x9, x20
    b.lo sequential_step
    mov x30, x17
    ret

// pass_random: `pages` touches at uniform pages; umulh maps a 64-bit draw onto [0, pages) with no
// division (the bias is below pages / 2**64).
pass_random:
    mov x17, x30
    bl load_multiplier
    mov x9, x20
random_step:
    xorshift x23
    mul x8, x23, x14
    umulh x10, x8, x20
    bl touch_page
    subs x9, x9, #1
    b.ne random_step
    mov x30, x17
    ret

// pass_hotcold: `pages` touches; one draw picks hot (below hot-chance percent) or cold, a second the page
// in that part. With no cold pages every touch is hot, and the first draw is still taken so the
// PRNG sequence does not depend on the split.
pass_hotcold:
    mov x17, x30
    bl load_multiplier
    mov x9, x20
    sub x16, x20, x25              // cold pages
    mov x15, #100
hotcold_step:
    xorshift x23
    mul x8, x23, x14
    umulh x11, x8, x15             // 0..99
    xorshift x23
    mul x8, x23, x14
    cbz x16, hotcold_hot
    cmp x11, x28
    b.lo hotcold_hot
    umulh x10, x8, x16
    add x10, x10, x25
    b hotcold_touch
hotcold_hot:
    umulh x10, x8, x25
hotcold_touch:
    bl touch_page
    subs x9, x9, #1
    b.ne hotcold_step
    mov x30, x17
    ret

// pass_increment: add 1 to the first byte of each page in turn, so RAM always holds one run of k+1
// followed by one run of k (the consistency oracle of DESIGN.md section 9).
pass_increment:
    mov x10, x19
    mov x9, x20
increment_step:
    ldrb w11, [x10]
    add w11, w11, #1
    strb w11, [x10]
    add x10, x10, #PAGE_SIZE
    subs x9, x9, #1
    b.ne increment_step
    ret

// load_multiplier: x14 = 0x2545f4914f6cdd1d, the xorshift64* output multiplier.
load_multiplier:
    movz x14, #0xdd1d
    movk x14, #0x4f6c, lsl #16
    movk x14, #0xf491, lsl #32
    movk x14, #0x2545, lsl #48
    ret

// touch_page: page index x10, pass tag x13; stores touch/8 words tag | (x10 << 12) | offset.
// Clobbers x10-x12; a leaf, so x30 stays the caller's.
touch_page:
    orr x12, x13, x10, lsl #12
    add x10, x19, x10, lsl #12
    add x11, x10, x24              // end of the touched bytes
touch_word:
    str x12, [x10], #8
    add x12, x12, #8
    cmp x10, x11
    b.lo touch_word
    ret

// request_checkpoint: print "checkpoint after pass K", ask the guest-inform device for a
// checkpoint and wait till the host has answered (done or failed: the run goes on the same).
// Between polls a delay loop, so a slow checkpoint costs few host calls. Clobbers x0-x7.
request_checkpoint:
    str x30, [sp, #-16]!
    adr x0, msg_checkpoint
    bl puts
    mov x0, x27
    bl print_dec
    mov x0, #10
    bl putc
    movz x1, #INFORM_BASE_HI, lsl #16
    mov w2, #REQUEST_CHECKPOINT
    str w2, [x1, #INFORM_REQUEST]
request_wait:
    mov x3, #POLL_DELAY
request_delay:
    subs x3, x3, #1
    b.ne request_delay
    ldr w2, [x1, #INFORM_REQUEST_STATUS]
    cmp w2, #STATUS_PENDING
    b.eq request_wait
    mov x2, #0                     // the answer (done or failed) leaves no trace in the
    cmp x2, #0                     // registers, nor in the flags
    ldr x30, [sp], #16
    ret

// putc: write the byte in w0 to the UART, waiting while its FIFO is full. Clobbers x1, x2.
putc:
    movz x1, #UART_BASE_HI, lsl #16
putc_wait:
    ldr w2, [x1, #UART_FR]
    tbnz w2, #5, putc_wait         // TXFF
    str w0, [x1]
    ret

// puts: write the NUL-terminated string at x0. Clobbers x0-x4.
puts:
    mov x3, x30
    mov x4, x0
puts_next:
    ldrb w0, [x4], #1
    cbz w0, puts_end
    bl putc
    b puts_next
puts_end:
    mov x30, x3
    ret

// print_dec: write x0 as an unsigned decimal number. Digits are built backwards in a 32-byte stack
// buffer (20 digits hold any 64-bit value). Clobbers x0-x7.
print_dec:
    stp x29, x30, [sp, #-48]!
    add x4, sp, #48                // one past the buffer end
    strb wzr, [x4, #-1]!           // NUL terminator
    mov x5, #10
print_dec_digit:
    udiv x6, x0, x5
    msub x7, x6, x5, x0
    add x7, x7, #48                // '0'
    strb w7, [x4, #-1]!
    mov x0, x6
    cbnz x0, print_dec_digit
    mov x0, x4
    bl puts
    ldp x29, x30, [sp], #48
    ret

// print_hex: write x0 as "0x" and 16 lowercase hex digits. Clobbers x0-x7.
print_hex:
    mov x7, x30
    mov x5, x0
    mov x0, #48                    // '0'
    bl putc
    mov x0, #120                   // 'x'
    bl putc
    mov x6, #60                    // shift of the top nibble
print_hex_digit:
    lsr x0, x5, x6
    and x0, x0, #0xf
    cmp x0, #10
    add x1, x0, #48                // '0'..'9'
    add x0, x0, #87                // 'a'..'f' ('a' - 10)
    csel x0, x1, x0, lo
    bl putc
    subs x6, x6, #4
    b.pl print_hex_digit
    mov x30, x7
    ret

// print_pattern: write the name of pattern x21. Clobbers x0-x5.
print_pattern:
    mov x5, x30
    adr x0, name_loop
    cmp x21, #PATTERN_SEQUENTIAL
    b.ne print_pattern_2
    adr x0, name_sequential
print_pattern_2:
    cmp x21, #PATTERN_RANDOM
    b.ne print_pattern_3
    adr x0, name_random
print_pattern_3:
    cmp x21, #PATTERN_HOTCOLD
    b.ne print_pattern_4
    adr x0, name_hotcold
print_pattern_4:
    cmp x21, #PATTERN_INCREMENT
    b.ne print_pattern_out
    adr x0, name_increment
print_pattern_out:
    bl puts
    mov x30, x5
    ret

// print_passes: write the pass count x22, or "forever" when it is 0. Clobbers x0-x7.
print_passes:
    mov x0, x22
    cbz x0, print_passes_forever
    b print_dec                    // tail call: print_dec returns to our caller
print_passes_forever:
    adr x0, msg_forever
    b puts

msg_start:     .asciz "pyvmm-workload: start pattern="
msg_pass:      .asciz "pyvmm-workload: pass "
msg_pattern:   .asciz " pattern="
msg_pages:     .asciz " pages="
msg_passes:    .asciz " passes="
msg_touch:     .asciz " touch="
msg_done:      .asciz "pyvmm-workload: done passes="
msg_checksum:  .asciz " checksum="
msg_forever:   .asciz "forever"
msg_checkpoint: .asciz "pyvmm-workload: checkpoint after pass "
msg_bad:       .asciz "pyvmm-workload: bad parameters\n"
name_loop:       .asciz "loop"
name_sequential: .asciz "sequential"
name_random:     .asciz "random"
name_hotcold:    .asciz "hotcold"
name_increment:  .asciz "increment"
