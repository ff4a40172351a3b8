/*
 * uartbridge.h - a C client for the uartbridge register bus (docs/bus-protocol.md, v1).
 *
 * Copyright (c) the uartbridge authors. MIT licence:
 *
 * Permission is hereby granted, free of charge, to any person obtaining a copy of this
 * software and associated documentation files (the "Software"), to deal in the Software
 * without restriction, including without limitation the rights to use, copy, modify, merge,
 * publish, distribute, sublicense, and/or sell copies of the Software, and to permit persons
 * to whom the Software is furnished to do so, subject to the following conditions:
 *
 * The above copyright notice and this permission notice shall be included in all copies or
 * substantial portions of the Software.
 *
 * THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED,
 * INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR
 * PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE
 * FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
 * OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER
 * DEALINGS IN THE SOFTWARE.
 *
 * ---------------------------------------------------------------------------------------
 *
 * What it does. An emulator (the guest side) drives a uartbridge 16550A over its bus socket:
 * ub_connect() says HELLO, ub_read() reads a register, ub_write() posts a write (no reply),
 * ub_write_n()/ub_read_n() are bursts, ub_sync() is a barrier. The UART's interrupt line
 * arrives as IRQ events, in the order the server sent them; the server sends every event a
 * reply observes *before* that reply, and this library delivers every event it has received
 * before the call that received it returns. So when ub_read() returns the IIR value, the
 * IRQ callback has already seen every level change that value reflects.
 *
 * Events are delivered two ways (use either or both):
 *   - a callback (ub_options.on_irq / ub_set_irq_callback), run at the end of every call
 *     that received something, once per event, oldest first;
 *   - a queue: without a callback the events wait until ub_next_irq() takes them.
 * For an emulator with its own event loop, ub_fd() is pollable: when it is readable, call
 * ub_process(), which takes in what has arrived without blocking. When a call returns, no
 * complete frame is left buffered inside the library, so poll() on the fd never sleeps
 * through an event (events still in the queue are the caller's: see ub_pending_irqs()).
 *
 * Errors. Every function that can fail returns a negative UB_E_* status (values >= 0 mean
 * success); ub_last_error() tells why, including the code and message of an ERROR frame
 * from the server (UB_E_REFUSED). Every failure except UB_E_ARG closes the connection (the
 * device stays exactly as it was, see the protocol); later calls return the same status
 * until ub_connect() reconnects. Reconnecting is always allowed. A failure found at the end
 * of a call, after its reply had arrived (an ERROR frame right behind a READ_REPLY, say),
 * does not undo that call: it returns its result (the register was read), ub_fd() turns
 * readable (it reads as end of file), and the next call returns the failure.
 *
 * Waiting. While waiting for a reply the library first busy-polls the socket for up to
 * spin_us (default 100 us; 0 never spins), as QEMU's poll-max-ns does: a reply usually comes
 * within tens of microseconds, and sleeping in poll() lets the CPU idle, whose wake-up can
 * double the round trip. Every wait (connect, send, reply) is bounded by timeout_ms.
 *
 * Thread safety. There is no global state and no internal locking. One ub_client must be
 * used by one thread at a time (calls on the same client must never overlap; give each
 * thread its own connection, or lock around every call yourself). Different clients are
 * independent and may be used from different threads at once. The IRQ callback runs on the
 * calling thread, inside the call, at a point where the client is consistent: it may call
 * any function on the same client except ub_free() (nested calls do not deliver events; the
 * outer delivery goes on). The library installs no signal handlers, never raises SIGPIPE
 * (it sends with MSG_NOSIGNAL) and retries system calls interrupted by a signal.
 * Do not read or write ub_fd() yourself (poll it only): that would break the framing.
 *
 * C99 and POSIX (sockets, poll, clock_gettime); nothing beyond libc.
 */
#ifndef UARTBRIDGE_H
#define UARTBRIDGE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define UB_PROTOCOL_VERSION 1
#define UB_MAX_FRAME_LEN 4096 /* type byte + payload */
#define UB_MAX_BURST 4094     /* WRITE_N data, READ_N count, READ_N_REPLY data per frame */
#define UB_MAX_NAME_LEN 255

/* Register offsets (DLAB in LCR selects DLL/DLM at 0/1, as on the chip). */
enum {
    UB_RBR = 0, UB_THR = 0, UB_DLL = 0,
    UB_IER = 1, UB_DLM = 1,
    UB_IIR = 2, UB_FCR = 2,
    UB_LCR = 3, UB_MCR = 4, UB_LSR = 5, UB_MSR = 6, UB_SCR = 7
};

/* A few bits a polled or interrupt-driven driver needs. */
#define UB_LSR_DR 0x01u
#define UB_LSR_OE 0x02u
#define UB_LSR_PE 0x04u
#define UB_LSR_FE 0x08u
#define UB_LSR_BI 0x10u
#define UB_LSR_THRE 0x20u
#define UB_LSR_TEMT 0x40u
#define UB_IER_RDI 0x01u
#define UB_IER_THRI 0x02u
#define UB_IER_RLSI 0x04u
#define UB_IER_MSI 0x08u
#define UB_IIR_NO_INT 0x01u
#define UB_LCR_DLAB 0x80u

/* HELLO_REPLY capability bits; a v1 server sets all three and this library needs them. */
#define UB_CAP_BURST 0x01u
#define UB_CAP_SYNC 0x02u
#define UB_CAP_IRQ_EVENTS 0x04u
#define UB_CAP_HELLO_TOKEN 0x08u /* HELLO's TOKEN field is understood; this library sends none */

/* Statuses returned by the functions below (negative: failure). */
enum {
    UB_OK = 0,
    UB_E_ARG = -1,      /* a bad argument (offset > 7, NULL, bad target); nothing was sent */
    UB_E_SYSTEM = -2,   /* a system call failed (connect, send, recv): see sys_errno */
    UB_E_TIMEOUT = -3,  /* no reply (or no connection, no room to send) within timeout_ms */
    UB_E_CLOSED = -4,   /* not connected, or the server closed the connection without ERROR */
    UB_E_REFUSED = -5,  /* the server sent an ERROR frame: see server_code, server_message */
    UB_E_PROTOCOL = -6  /* the server broke the protocol (a bad or unexpected frame) */
};

/* The codes of the server's ERROR frames (docs/bus-protocol.md section 4.7). */
enum {
    UB_BUS_MALFORMED = 1,
    UB_BUS_UNKNOWN_TYPE = 2,
    UB_BUS_BAD_OFFSET = 3,
    UB_BUS_VERSION_MISMATCH = 4,
    UB_BUS_BUSY = 5,
    UB_BUS_FRAME_TOO_LARGE = 6,
    UB_BUS_PROTOCOL = 7,
    UB_BUS_NOT_PERMITTED = 8,
    UB_BUS_STALLED = 9,
    UB_BUS_SHUTTING_DOWN = 10,
    UB_BUS_INTERNAL = 11
};

/* The last failure of a client. */
typedef struct ub_error {
    int status;                 /* the UB_E_* status it was returned as; UB_OK: none yet */
    int server_code;            /* UB_E_REFUSED: the ERROR frame's code (UB_BUS_*); else 0 */
    int sys_errno;              /* UB_E_SYSTEM: errno; else 0 */
    size_t server_message_len;  /* UB_E_REFUSED: bytes in server_message */
    char server_message[256];   /* the ERROR frame's message as sent (UTF-8, cut at 255 bytes;
                                   NUL-terminated) */
    char message[400];          /* one line for humans, e.g. "bus server error BUSY: ..." */
} ub_error;

typedef struct ub_client ub_client;

/* An IRQ event: the line changed to level (0 or 1). ctx is the pointer given with it. */
typedef void (*ub_irq_fn)(void *ctx, int level);

typedef struct ub_options {
    int timeout_ms;      /* bound on each wait (connect, send, reply); < 0: forever.
                            Default 10000. */
    unsigned spin_us;    /* busy-poll window before sleeping in poll(); 0: never. Default 100. */
    ub_irq_fn on_irq;    /* NULL: events wait in the queue for ub_next_irq() */
    void *irq_ctx;
} ub_options;

/* Fill *options with the defaults. */
void ub_options_init(ub_options *options);

/* A new, unconnected client (options copied; NULL: the defaults). NULL only when out of
   memory. */
ub_client *ub_new(const ub_options *options);

/* Connect to target and exchange HELLO. target is a Unix socket path or "tcp:HOST:PORT"
   (HOST may be [v6]). A connected client is disconnected first, so this also reconnects.
   The IRQ level the server reports becomes an event when it differs from ub_irq() before
   the call (0 for a new client). Returns UB_OK or a status. */
int ub_connect(ub_client *client, const char *target);

/* The same on a connected stream socket you made (socket activation, socketpair); the
   client owns fd from now on and closes it. */
int ub_attach_fd(ub_client *client, int fd);

/* Close the connection (the device stays as it is). Queued events stay queued. */
void ub_close(ub_client *client);

/* Close and free; NULL is allowed. */
void ub_free(ub_client *client);

/* Read the register at offset (0..7): the value (0..255) or a status. */
int ub_read(ub_client *client, unsigned offset);

/* Read n registers in order in one round trip (the READs are pipelined; the device sees
   exactly ub_read(offsets[0]), ub_read(offsets[1]), ...). n <= 256. Returns UB_OK. */
int ub_read_regs(ub_client *client, const unsigned char *offsets, size_t n,
                 unsigned char *values);

/* Write value to the register at offset (posted: returns once sent, with no reply). */
int ub_write(ub_client *client, unsigned offset, unsigned value);

/* n writes of data[0], data[1], ... to offset, in order, in as few WRITE_N frames as fit
   (posted). n == 0 sends nothing. */
int ub_write_n(ub_client *client, unsigned offset, const void *data, size_t n);

/* Up to n reads of offset into buf; returns how many were read or a status. From RBR (offset
   0, DLAB 0) it stops early when LSR.DR = 0 or a line error is pending (the protocol's
   READ_N); any other offset reads exactly n. */
long ub_read_n(ub_client *client, unsigned offset, void *buf, size_t n);

/* A barrier: returns when the server has executed everything sent before (and every IRQ
   event those writes caused has been delivered). */
int ub_sync(ub_client *client);

/* Take in whatever the server has sent, without blocking, and deliver the events. Returns
   the number of IRQ events taken in (>= 0) or a status. */
int ub_process(ub_client *client);

/* Block until the IRQ line is high or timeout_ms passes (< 0: forever). Returns the level
   (1 or 0) or a status. */
int ub_wait_irq(ub_client *client, int timeout_ms);

/* The socket, for poll()/epoll (POLLIN: call ub_process()); -1 when not connected. */
int ub_fd(const ub_client *client);

/* The IRQ level as of the last frame received (events not yet delivered included). */
int ub_irq(const ub_client *client);

/* Set (or with NULL clear) the IRQ callback. */
void ub_set_irq_callback(ub_client *client, ub_irq_fn on_irq, void *ctx);

/* Events received and not yet delivered (only without a callback do they stay). */
unsigned long ub_pending_irqs(const ub_client *client);

/* Take the oldest queued event: its level (0 or 1), or -1 when none is queued. */
int ub_next_irq(ub_client *client);

/* What HELLO_REPLY said; valid after a successful ub_connect. */
int ub_connected(const ub_client *client);
unsigned ub_server_version(const ub_client *client);
uint32_t ub_capabilities(const ub_client *client);
/* The UART's name: NUL-terminated UTF-8 (cut at the first NUL if the name holds one). */
const char *ub_name(const ub_client *client);

/* The last failure (status UB_OK when there was none). */
const ub_error *ub_last_error(const ub_client *client);

/* "UB_E_TIMEOUT"..., and "BUSY"... ("?" for codes this version does not know). */
const char *ub_status_name(int status);
const char *ub_bus_error_name(int code);

/* ---- The frame decoder, pure (no I/O). Public so it can be tested on its own and used by
   callers with a transport of their own. ---- */

enum {
    UB_T_HELLO = 0x01, UB_T_READ = 0x02, UB_T_WRITE = 0x03, UB_T_WRITE_N = 0x04,
    UB_T_READ_N = 0x05, UB_T_SYNC = 0x06, UB_T_TIME = 0x07 /* v2 */,
    UB_T_HELLO_REPLY = 0x81, UB_T_READ_REPLY = 0x82, UB_T_READ_N_REPLY = 0x85,
    UB_T_SYNC_REPLY = 0x86, UB_T_IRQ = 0x90, UB_T_DEADLINE = 0x91 /* v2 */, UB_T_ERROR = 0xFF
};

/* DEADLINE's u64 for "no timer armed" (protocol v2, docs/bus-protocol.md section 4.8). */
#define UB_NO_DEADLINE UINT64_MAX

/* One decoded frame; data points into the buffer that was parsed. */
typedef struct ub_frame {
    unsigned type;        /* UB_T_* */
    unsigned offset;      /* READ, WRITE, WRITE_N, READ_N, READ_REPLY, READ_N_REPLY */
    unsigned value;       /* WRITE, READ_REPLY: the value; READ_N: the count; IRQ: the level;
                             ERROR: the code; HELLO_REPLY: the IRQ level */
    unsigned version;     /* HELLO, HELLO_REPLY */
    uint32_t u32;         /* SYNC, SYNC_REPLY: the token; HELLO_REPLY: the capabilities */
    const unsigned char *data; /* WRITE_N, READ_N_REPLY: the bytes; HELLO_REPLY: the name;
                                  ERROR: the message */
    size_t data_len;
    uint64_t u64;         /* v2 TIME: the guest's time; DEADLINE: the deadline (ns, or
                             UB_NO_DEADLINE). This client speaks v1 and never receives them;
                             the decoder knows them for callers with a transport of their own. */
} ub_frame;

/* Decode the frame at the start of buf[0..len). Returns its size on the wire (> 0) with
   *frame filled in; 0 when more bytes are needed; or -(UB_BUS_* code) when the bytes are not
   a valid frame (a bad length is found as soon as the two length bytes are in). Validates
   exactly as docs/bus-protocol.md section 3 says (and as uartbridge.bus.codec does). */
long ub_parse_frame(const void *buf, size_t len, ub_frame *frame);

#ifdef __cplusplus
}
#endif

#endif /* UARTBRIDGE_H */
