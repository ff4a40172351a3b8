/*
 * irq_echo - an interrupt-driven guest in an event loop of its own: it sleeps in poll() on
 * the bus socket, and when the UART's IRQ line is high it services the UART as a driver's
 * interrupt handler does (IIR says why). It echoes what the far end types until 'q', or
 * until 10 s pass with no interrupt.
 *
 *   cc -o irq_echo irq_echo.c $(pkg-config --cflags --libs uartbridge)
 *   ./irq_echo /run/uartbridge/uart0.bus
 *
 * Copyright (c) the uartbridge authors. MIT licence (see uartbridge.h).
 */
#define _POSIX_C_SOURCE 200809L
#include <poll.h>
#include <stdio.h>
#include <uartbridge.h>

static int line; /* the IRQ line, as the events have told it */

static void on_irq(void *ctx, int level)
{
    (void)ctx;
    line = level; /* an interrupt controller would latch or forward it here */
}

int main(int argc, char **argv)
{
    ub_options options;
    ub_client *c;
    unsigned char buf[256];
    int r = UB_OK, done = 0;

    ub_options_init(&options);
    options.on_irq = on_irq;
    c = ub_new(&options);
    if (argc != 2 || c == NULL || ub_connect(c, argv[1]) != UB_OK) {
        fprintf(stderr, "irq_echo: %s\n", c ? ub_last_error(c)->message : "usage: irq_echo BUS");
        return 69;
    }
    ub_write(c, UB_LCR, 0x03);       /* 8N1 */
    ub_write(c, UB_FCR, 0x07);       /* FIFOs on, cleared, RX trigger 1 */
    ub_write(c, UB_IER, UB_IER_RDI); /* interrupt on received data */
    r = ub_sync(c);
    if (r >= 0) {
        printf("irq_echo: serving %s\n", ub_name(c)); /* FCR cleared the FIFOs: type now */
        fflush(stdout);
    }
    while (r >= 0 && !done) {
        struct pollfd p = {ub_fd(c), POLLIN, 0};
        if (!line) { /* the CPU idles until the line rises */
            if (poll(&p, 1, 10000) == 0)
                break;
            r = ub_process(c); /* takes the IRQ event: on_irq runs */
            continue;
        }
        /* The handler. The reads below deliver the events they cause before they return,
           so `line` is exact after each one. */
        int iir = ub_read(c, UB_IIR);
        long n;
        if (iir < 0) {
            r = iir;
        } else if (iir & UB_IIR_NO_INT) {
            continue; /* nothing pending (the line has dropped by now) */
        } else if ((iir & 0x0E) == 0x04 || (iir & 0x0E) == 0x0C) { /* RDI, or timeout */
            n = ub_read_n(c, UB_RBR, buf, sizeof buf); /* stops when RBR is empty */
            for (long i = 0; i < n; i++)
                done |= buf[i] == 'q';
            /* Echo as one burst: the server lets the port take each byte before a THR
               write could overwrite one (docs/bus-protocol.md 4.3). */
            r = n < 0 ? (int)n : ub_write_n(c, UB_THR, buf, (size_t)n);
        } else if ((iir & 0x0E) == 0x06) { /* line status */
            r = ub_read(c, UB_LSR);
        } else if ((iir & 0x0E) == 0x00) { /* modem status */
            r = ub_read(c, UB_MSR);
        }
    }
    if (r >= 0)
        r = ub_sync(c);
    if (r < 0)
        fprintf(stderr, "irq_echo: %s\n", ub_last_error(c)->message);
    ub_free(c);
    return r < 0 ? 74 : 0;
}
