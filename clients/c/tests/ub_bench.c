/*
 * ub_bench - READ round trips through libuartbridge, for bench/c_client.py.
 *
 *   ub_bench BUS READS SPIN_US RUNS
 *
 * Per run: READS timed ub_read(SCR) calls (clock_gettime, CLOCK_MONOTONIC, around each
 * call); prints one line per run: "run P50_NS P99_NS MAX_NS" (nearest rank).
 *
 * Copyright (c) the uartbridge authors. MIT licence (see uartbridge.h).
 */
#define _POSIX_C_SOURCE 200809L
#include "uartbridge.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
    long long x = *(const long long *)a, y = *(const long long *)b;
    return (x > y) - (x < y);
}

static long long rank(const long long *sorted, long n, double q)
{
    long i = (long)(q * (double)(n - 1) + 0.5);
    return sorted[i < 0 ? 0 : (i >= n ? n - 1 : i)];
}

int main(int argc, char **argv)
{
    ub_options o;
    ub_client *c;
    long reads, runs, i, run;
    long long *t;
    if (argc != 5) {
        fprintf(stderr, "usage: ub_bench BUS READS SPIN_US RUNS\n");
        return 64;
    }
    reads = atol(argv[2]);
    runs = atol(argv[4]);
    if (reads < 1 || runs < 1) {
        fprintf(stderr, "ub_bench: READS and RUNS must be >= 1\n");
        return 64;
    }
    ub_options_init(&o);
    o.spin_us = (unsigned)atol(argv[3]);
    c = ub_new(&o);
    t = malloc(sizeof *t * (size_t)reads);
    if (c == NULL || t == NULL || ub_connect(c, argv[1]) != UB_OK) {
        fprintf(stderr, "ub_bench: %s\n", c ? ub_last_error(c)->message : "out of memory");
        return 69;
    }
    for (i = 0; i < 1000; i++) /* warm-up */
        if (ub_read(c, UB_SCR) < 0)
            goto failed;
    for (run = 0; run < runs; run++) {
        for (i = 0; i < reads; i++) {
            long long start = now_ns();
            if (ub_read(c, UB_SCR) < 0)
                goto failed;
            t[i] = now_ns() - start;
        }
        qsort(t, (size_t)reads, sizeof *t, cmp);
        printf("run %lld %lld %lld\n", rank(t, reads, 0.50), rank(t, reads, 0.99), t[reads - 1]);
        fflush(stdout);
    }
    ub_free(c);
    free(t);
    return 0;
failed:
    fprintf(stderr, "ub_bench: %s\n", ub_last_error(c)->message);
    return 74;
}
