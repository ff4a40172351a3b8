/*
 * hello - the smallest useful bus guest: a polled ns16550 driver that prints a line through
 * the UART and echoes what the far end types, until it types 'q' (or 10 s of silence).
 *
 *   cc -o hello hello.c $(pkg-config --cflags --libs uartbridge)
 *   ./hello /run/uartbridge/uart0.bus
 *
 * Copyright (c) the uartbridge authors. MIT licence (see uartbridge.h).
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <time.h>
#include <uartbridge.h>

static int put(ub_client *c, int ch)
{
    int lsr;
    while ((lsr = ub_read(c, UB_LSR)) >= 0 && !(lsr & UB_LSR_THRE)) {
    }
    return lsr < 0 ? lsr : ub_write(c, UB_THR, (unsigned)ch);
}

int main(int argc, char **argv)
{
    ub_client *c = ub_new(NULL);
    const char *text = "hello from C\r\n";
    struct timespec tick = {0, 1000000}; /* 1 ms between polls of an idle line */
    int r = UB_OK, idle_ms = 0;

    if (argc != 2 || c == NULL || ub_connect(c, argv[1]) != UB_OK) {
        fprintf(stderr, "hello: %s\n", c ? ub_last_error(c)->message : "usage: hello BUS");
        return 69;
    }
    ub_write(c, UB_LCR, 0x03); /* 8N1 */
    ub_write(c, UB_FCR, 0x07); /* FIFOs on and cleared */
    while (*text && r >= 0)
        r = put(c, *text++);
    while (r >= 0 && idle_ms < 10000) {
        int lsr = ub_read(c, UB_LSR), ch;
        if (lsr < 0) {
            r = lsr;
        } else if (!(lsr & UB_LSR_DR)) {
            nanosleep(&tick, NULL);
            idle_ms++;
        } else if ((ch = ub_read(c, UB_RBR)) >= 0) {
            idle_ms = 0;
            if (ch == 'q')
                break;
            r = put(c, ch);
        } else {
            r = ch;
        }
    }
    if (r >= 0)
        r = ub_sync(c); /* everything written has been executed */
    if (r < 0)
        fprintf(stderr, "hello: %s\n", ub_last_error(c)->message);
    ub_free(c);
    return r < 0 ? 74 : 0;
}
