/*
 * ub_check - checks of libuartbridge against a real uartbridge daemon.
 * Run by tests/test_c_client.py, which starts the daemon, socat and the far end:
 *
 *   ub_check semantics BUS          register semantics through the bus
 *   ub_check irq BUS                IRQ events: order, callback, queue, pollable fd
 *   ub_check burst BUS N            write_n of N bytes to THR; then read_n what comes in
 *   ub_check reconnect BUS          survives a daemon restart (stdin: "go" when restarted)
 *   ub_check refused BUS            BUSY for a second guest, MALFORMED surfaced
 *   ub_check connect BUS [MS]       connect (timeout MS) and report the status
 *
 * Prints "ok NAME" and exits 0, or prints "FAIL file:line: ..." and exits 1. Lines starting
 * with "> " are for the driving test (a step it must act on, or data it checks).
 *
 * Copyright (c) the uartbridge authors. MIT licence (see uartbridge.h).
 */
#define _POSIX_C_SOURCE 200809L

#include "uartbridge.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static ub_client *current; /* for the failure message */

static void failed(const char *file, int line, const char *what, long got)
{
    const ub_error *e = current ? ub_last_error(current) : NULL;
    printf("FAIL %s:%d: %s (got %ld", file, line, what, got);
    if (e != NULL && e->status != UB_OK)
        printf("; last error %s code %d: %s", ub_status_name(e->status), e->server_code,
               e->message);
    printf(")\n");
    fflush(stdout);
    exit(1);
}

/* CHECK(expr): expr must be true. CHECK_EQ(a, b): a == b (longs). */
#define CHECK(expr) ((expr) ? (void)0 : failed(__FILE__, __LINE__, #expr, 0))
#define CHECK_EQ(a, b)                                                                        \
    do {                                                                                      \
        long a_ = (long)(a), b_ = (long)(b);                                                  \
        if (a_ != b_)                                                                         \
            failed(__FILE__, __LINE__, #a " == " #b, a_);                                     \
    } while (0)

static void say(const char *fmt, const char *arg)
{
    printf("> ");
    printf(fmt, arg);
    printf("\n");
    fflush(stdout);
}

static void wait_for_go(void)
{
    char line[64];
    CHECK(fgets(line, sizeof line, stdin) != NULL);
    CHECK(strncmp(line, "go", 2) == 0);
}

static ub_client *connect_spin(const char *bus, ub_irq_fn on_irq, void *ctx, unsigned spin_us)
{
    ub_options o;
    ub_client *c;
    ub_options_init(&o);
    o.spin_us = spin_us;
    o.timeout_ms = 20000; /* generous: the machine may be loaded */
    o.on_irq = on_irq;
    o.irq_ctx = ctx;
    c = ub_new(&o);
    CHECK(c != NULL);
    current = c;
    CHECK_EQ(ub_connect(c, bus), UB_OK);
    return c;
}

static ub_client *connect_to(const char *bus, ub_irq_fn on_irq, void *ctx)
{
    return connect_spin(bus, on_irq, ctx, 100);
}

static void set_8n1_fifo(ub_client *c)
{
    CHECK_EQ(ub_write(c, UB_LCR, 0x03), UB_OK);
    CHECK_EQ(ub_write(c, UB_FCR, 0x07), UB_OK); /* FIFOs on, both cleared, trigger 1 */
    CHECK_EQ(ub_write(c, UB_IER, 0x00), UB_OK);
    CHECK_EQ(ub_sync(c), UB_OK);
}

/* ---- semantics ---------------------------------------------------------------------------- */

static int check_semantics(const char *bus)
{
    ub_client *c = connect_to(bus, NULL, NULL);
    unsigned char buf[8], offsets[3] = {UB_LCR, UB_SCR, UB_LSR}, values[3];
    static const unsigned char three[3] = {1, 2, 3};

    CHECK(strcmp(ub_name(c), "uart0") == 0);
    CHECK_EQ(ub_server_version(c), 1);
    CHECK_EQ(ub_capabilities(c) & 0x7, 0x7);
    CHECK_EQ(ub_irq(c), 0);
    set_8n1_fifo(c);

    /* SCR round trip; WRITE_N is exactly N writes; READ_N off RBR is exactly N reads. */
    CHECK_EQ(ub_write(c, UB_SCR, 0xA5), UB_OK);
    CHECK_EQ(ub_read(c, UB_SCR), 0xA5);
    CHECK_EQ(ub_write_n(c, UB_SCR, three, 3), UB_OK);
    CHECK_EQ(ub_read(c, UB_SCR), 3);
    memset(buf, 0, sizeof buf);
    CHECK_EQ(ub_read_n(c, UB_SCR, buf, 5), 5);
    CHECK(memcmp(buf, "\3\3\3\3\3", 5) == 0);

    /* LSR: THRE and TEMT when idle, and again right after a THR write (the port takes the
       byte within the write: docs/bus-protocol.md section 5). */
    CHECK_EQ(ub_read(c, UB_LSR), UB_LSR_THRE | UB_LSR_TEMT);
    CHECK_EQ(ub_write(c, UB_THR, 'x'), UB_OK);
    CHECK_EQ(ub_read(c, UB_LSR), UB_LSR_THRE | UB_LSR_TEMT);

    /* DLAB selects the divisor latch at 0/1; READ_N at 0 with DLAB=1 reads DLL N times. */
    CHECK_EQ(ub_write(c, UB_LCR, 0x83), UB_OK);
    CHECK_EQ(ub_write(c, UB_DLL, 0x0C), UB_OK);
    CHECK_EQ(ub_write(c, UB_DLM, 0x00), UB_OK);
    CHECK_EQ(ub_read(c, UB_DLL), 0x0C);
    CHECK_EQ(ub_read_n(c, UB_DLL, buf, 3), 3);
    CHECK(memcmp(buf, "\x0c\x0c\x0c", 3) == 0);
    CHECK_EQ(ub_write(c, UB_LCR, 0x03), UB_OK);

    /* Pipelined reads see exactly what one-by-one reads would. */
    CHECK_EQ(ub_read_regs(c, offsets, 3, values), UB_OK);
    CHECK_EQ(values[0], 0x03);
    CHECK_EQ(values[1], 3);
    CHECK_EQ(values[2], UB_LSR_THRE | UB_LSR_TEMT);

    /* Nothing received: READ_N from RBR stops at once (LSR.DR = 0). */
    CHECK_EQ(ub_read_n(c, UB_RBR, buf, 8), 0);

    /* Bad arguments are refused before anything is sent; the connection stays. */
    CHECK_EQ(ub_read(c, 8), UB_E_ARG);
    CHECK_EQ(ub_last_error(c)->status, UB_E_ARG);
    CHECK_EQ(ub_write(c, UB_SCR, 256), UB_E_ARG);
    CHECK_EQ(ub_write_n(c, 9, three, 3), UB_E_ARG);
    CHECK(ub_connected(c));
    CHECK_EQ(ub_sync(c), UB_OK);
    CHECK_EQ(ub_read(c, UB_SCR), 3);
    ub_free(c);
    printf("ok semantics\n");
    return 0;
}

/* ---- IRQ events --------------------------------------------------------------------------- */

struct events {
    int level[64];
    int n;
};

static void record(void *ctx, int level)
{
    struct events *ev = ctx;
    CHECK(ev->n < 64);
    ev->level[ev->n++] = level;
}

static int poll_in(int fd, int timeout_ms)
{
    struct pollfd pfd;
    int r;
    pfd.fd = fd;
    pfd.events = POLLIN;
    do {
        pfd.revents = 0;
        r = poll(&pfd, 1, timeout_ms);
    } while (r < 0 && errno == EINTR);
    return r;
}

static ub_client *nested_client;
static int handled_iir = -1;

static void handler(void *ctx, int level)
{
    record(ctx, level);
    if (level == 1)
        handled_iir = ub_read(nested_client, UB_IIR);
}

static int check_irq(const char *bus)
{
    struct events ev = {{0}, 0};
    ub_client *c = connect_spin(bus, record, &ev, 0); /* never spin: poll() only */
    int iir, byte, r;

    set_8n1_fifo(c);
    CHECK_EQ(ev.n, 0);

    /* IER=THRI raises the line: the event is delivered before ub_sync returns. */
    CHECK_EQ(ub_write(c, UB_IER, UB_IER_THRI), UB_OK);
    CHECK_EQ(ub_sync(c), UB_OK);
    CHECK_EQ(ev.n, 1);
    CHECK_EQ(ev.level[0], 1);
    CHECK_EQ(ub_irq(c), 1);

    /* Reading IIR (THRI) acknowledges it: IRQ(0) is delivered before the read returns. */
    iir = ub_read(c, UB_IIR);
    CHECK_EQ(iir & 0x0F, 0x02);
    CHECK_EQ(ev.n, 2);
    CHECK_EQ(ev.level[1], 0);
    CHECK_EQ(ub_read(c, UB_IIR) & 0x0F, UB_IIR_NO_INT);
    CHECK_EQ(ev.n, 2);

    /* A THR write on an idle line with THRI pending: THRI drops, the byte goes to the wire,
       THRI rises again, all within the frame; both edges come, in order, before the next
       reply (docs/bus-protocol.md section 4.6). */
    ev.n = 0;
    CHECK_EQ(ub_write(c, UB_THR, 'z'), UB_OK); /* THRI was acknowledged: it rises (1) */
    CHECK_EQ(ub_sync(c), UB_OK);
    CHECK_EQ(ev.n, 1);
    CHECK_EQ(ev.level[0], 1);
    CHECK_EQ(ub_write(c, UB_THR, 'y'), UB_OK); /* THRI pending: it drops and rises (0, 1) */
    CHECK_EQ(ub_read(c, UB_LSR) & UB_LSR_TEMT, UB_LSR_TEMT);
    CHECK_EQ(ev.n, 3);
    CHECK_EQ(ev.level[1], 0);
    CHECK_EQ(ev.level[2], 1);

    /* A callback may call back into the client, as an interrupt handler does: the IIR read
       inside it acknowledges THRI, and the IRQ(0) it causes is delivered after it returns. */
    ev.n = 0;
    nested_client = c;
    ub_set_irq_callback(c, handler, &ev);
    CHECK_EQ(ub_write(c, UB_IER, 0x00), UB_OK); /* line drops (THRI masked) */
    CHECK_EQ(ub_write(c, UB_IER, UB_IER_THRI), UB_OK); /* rises: the handler acknowledges it */
    CHECK_EQ(ub_sync(c), UB_OK);
    CHECK_EQ(ev.n, 3);
    CHECK_EQ(ev.level[0], 0);
    CHECK_EQ(ev.level[1], 1);
    CHECK_EQ(ev.level[2], 0);
    CHECK_EQ(handled_iir & 0x0F, 0x02);
    CHECK_EQ(ub_irq(c), 0);

    /* Without a callback the events wait in the queue. */
    ub_set_irq_callback(c, NULL, NULL);
    CHECK_EQ(ub_write(c, UB_THR, 'w'), UB_OK); /* THRI rises */
    CHECK_EQ(ub_write(c, UB_IER, 0x00), UB_OK); /* and is masked */
    CHECK_EQ(ub_sync(c), UB_OK);
    CHECK_EQ(ub_pending_irqs(c), 2);
    CHECK_EQ(ub_next_irq(c), 1);
    CHECK_EQ(ub_next_irq(c), 0);
    CHECK_EQ(ub_next_irq(c), -1);

    /* The fd is pollable: a posted write's IRQ event makes it readable; ub_process takes it. */
    CHECK_EQ(ub_write(c, UB_IER, UB_IER_THRI), UB_OK);
    CHECK_EQ(poll_in(ub_fd(c), 20000), 1);
    r = ub_process(c);
    while (r == 0 && poll_in(ub_fd(c), 20000) == 1)
        r = ub_process(c);
    CHECK_EQ(r, 1);
    CHECK_EQ(ub_next_irq(c), 1);
    CHECK_EQ(ub_process(c), 0); /* nothing more */
    CHECK_EQ(ub_read(c, UB_IIR) & 0x0F, 0x02);
    CHECK_EQ(ub_next_irq(c), 0);

    /* An event between frames: a byte from the far end raises RDI; ub_wait_irq sees it, and
       the RBR read that clears it has delivered IRQ(0) when it returns. */
    CHECK_EQ(ub_write(c, UB_IER, UB_IER_RDI), UB_OK);
    CHECK_EQ(ub_sync(c), UB_OK);
    CHECK_EQ(ub_pending_irqs(c), 0);
    say("send %s", "Q");
    CHECK_EQ(ub_wait_irq(c, 20000), 1);
    CHECK_EQ(ub_next_irq(c), 1);
    byte = ub_read(c, UB_RBR);
    CHECK_EQ(byte, 'Q');
    CHECK_EQ(ub_next_irq(c), 0);
    CHECK_EQ(ub_wait_irq(c, 0), 0);

    ub_free(c);
    printf("ok irq\n");
    return 0;
}

/* ---- bursts ------------------------------------------------------------------------------- */

static int check_burst(const char *bus, long n)
{
    ub_client *c = connect_to(bus, NULL, NULL);
    unsigned char *data = malloc((size_t)n), *got = malloc(65536);
    long i, total = 0, r;
    struct timespec pause = {0, 2000000};
    int idle = 0;

    CHECK(data != NULL && got != NULL);
    for (i = 0; i < n; i++)
        data[i] = (unsigned char)(i * 7 + 3);
    set_8n1_fifo(c);
    CHECK_EQ(ub_write_n(c, UB_THR, data, (size_t)n), UB_OK);
    CHECK_EQ(ub_sync(c), UB_OK);
    say("sent %s", "burst");

    /* The far end now sends its bytes; read them with READ_N until it says how many. */
    CHECK_EQ(ub_read_n(c, UB_RBR, got, 16), 0);
    say("ready %s", "rx");
    while (idle < 5000) { /* 10 s without a byte */
        r = ub_read_n(c, UB_RBR, got + total, (size_t)(65536 - total));
        CHECK(r >= 0);
        if (r == 0) {
            idle++;
            nanosleep(&pause, NULL);
            if (total > 0 && idle > 250)
                break; /* 0.5 s quiet after data: the far end is done */
            continue;
        }
        idle = 0;
        total += r;
    }
    printf("> rx %ld ", total);
    for (i = 0; i < total; i++)
        printf("%02x", got[i]);
    printf("\n");
    free(data);
    free(got);
    ub_free(c);
    printf("ok burst\n");
    return 0;
}

/* ---- reconnect ---------------------------------------------------------------------------- */

static int check_reconnect(const char *bus)
{
    ub_client *c = connect_to(bus, NULL, NULL);
    const ub_error *e;
    int r, tries;
    struct timespec pause = {0, 20000000};

    set_8n1_fifo(c);
    CHECK_EQ(ub_write(c, UB_SCR, 0x5A), UB_OK);
    CHECK_EQ(ub_sync(c), UB_OK);
    say("restart %s", "now");
    wait_for_go();

    /* The daemon said SHUTTING_DOWN before it closed; the next call reports it. */
    r = ub_process(c);
    CHECK_EQ(r, UB_E_REFUSED);
    e = ub_last_error(c);
    CHECK_EQ(e->server_code, UB_BUS_SHUTTING_DOWN);
    CHECK(strstr(e->message, "SHUTTING_DOWN") != NULL);
    CHECK(!ub_connected(c));
    CHECK_EQ(ub_fd(c), -1);
    /* ...and every call after it, until a reconnect. */
    CHECK_EQ(ub_read(c, UB_SCR), UB_E_REFUSED);
    CHECK_EQ(ub_last_error(c)->server_code, UB_BUS_SHUTTING_DOWN);

    /* The new daemon resumed the device from its checkpoint: the same registers. */
    for (tries = 0; (r = ub_connect(c, bus)) != UB_OK && tries < 1000; tries++)
        nanosleep(&pause, NULL);
    CHECK_EQ(r, UB_OK);
    CHECK_EQ(ub_last_error(c)->status, UB_OK);
    CHECK_EQ(ub_read(c, UB_SCR), 0x5A);
    CHECK_EQ(ub_read(c, UB_LCR), 0x03);
    ub_free(c);
    printf("ok reconnect\n");
    return 0;
}

/* ---- refused peers ------------------------------------------------------------------------ */

static int check_refused(const char *bus)
{
    ub_client *a = connect_to(bus, NULL, NULL);
    ub_client *b = ub_new(NULL);
    const ub_error *e;
    static const unsigned char zero_length[2] = {0, 0};

    CHECK(b != NULL);
    current = b;
    /* A second guest waits out the grace period, then gets ERROR BUSY. */
    CHECK_EQ(ub_connect(b, bus), UB_E_REFUSED);
    e = ub_last_error(b);
    CHECK_EQ(e->status, UB_E_REFUSED);
    CHECK_EQ(e->server_code, UB_BUS_BUSY);
    CHECK(e->server_message_len > 0);
    CHECK(strstr(e->message, "BUSY") != NULL);
    say("busy %s", e->message);
    CHECK(!ub_connected(b));

    /* The first guest is untouched. */
    current = a;
    CHECK_EQ(ub_write(a, UB_SCR, 0x11), UB_OK);
    CHECK_EQ(ub_read(a, UB_SCR), 0x11);

    /* A broken frame (length 0) costs the connection: the ERROR's code comes back. */
    CHECK(write(ub_fd(a), zero_length, 2) == 2);
    CHECK_EQ(ub_sync(a), UB_E_REFUSED);
    e = ub_last_error(a);
    CHECK_EQ(e->server_code, UB_BUS_MALFORMED);
    say("malformed %s", e->message);

    /* The slot is free again; the device kept its state. */
    current = b;
    CHECK_EQ(ub_connect(b, bus), UB_OK);
    CHECK_EQ(ub_read(b, UB_SCR), 0x11);
    ub_free(a);
    ub_free(b);
    printf("ok refused\n");
    return 0;
}

static int check_connect(const char *bus, int timeout_ms)
{
    ub_options o;
    ub_client *c;
    int r;
    ub_options_init(&o);
    o.timeout_ms = timeout_ms;
    c = ub_new(&o);
    CHECK(c != NULL);
    r = ub_connect(c, bus);
    printf("> connect %s %d %s\n", ub_status_name(r), ub_last_error(c)->server_code,
           ub_last_error(c)->message);
    ub_free(c);
    printf("ok connect\n");
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 3 && strcmp(argv[1], "semantics") == 0)
        return check_semantics(argv[2]);
    if (argc >= 3 && strcmp(argv[1], "irq") == 0)
        return check_irq(argv[2]);
    if (argc >= 4 && strcmp(argv[1], "burst") == 0)
        return check_burst(argv[2], atol(argv[3]));
    if (argc >= 3 && strcmp(argv[1], "reconnect") == 0)
        return check_reconnect(argv[2]);
    if (argc >= 3 && strcmp(argv[1], "refused") == 0)
        return check_refused(argv[2]);
    if (argc >= 3 && strcmp(argv[1], "connect") == 0)
        return check_connect(argv[2], argc >= 4 ? atoi(argv[3]) : 10000);
    fprintf(stderr, "usage: ub_check semantics|irq|burst|reconnect|refused|connect BUS [N]\n");
    return 64;
}
