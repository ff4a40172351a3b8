/*
 * ub_decode - the decoder and receive path of libuartbridge, fed from stdin, for a
 * property test against uartbridge.bus.codec (tests/test_c_client.py).
 *
 * One request per line, one answer line per request:
 *
 *   frames SEED HEX   feed the bytes in chunks (sizes drawn from SEED) into a buffer and
 *                     decode with ub_parse_frame() as they come; answer one token per frame,
 *                     then "err:CODE" (the first invalid frame) or "end:N" (N bytes left over)
 *   client SEED CLOSE HEX
 *                     a client on one end of a socketpair; a child process plays the server:
 *                     it reads the HELLO, then writes the bytes in chunks (sizes drawn from
 *                     SEED), then closes (CLOSE = 1) or stays connected and says it is done
 *                     through a pipe (CLOSE = 0). Answers "irq:L" per event delivered, then
 *                     "hello:VER:CAPS:NAMEHEX" if HELLO succeeded, then "level:L" (ub_irq()
 *                     at the end) and "status:NAME:CODE:MSGHEX" for the status that ended
 *                     the connection, or "status:idle:0:" when the server stayed connected
 *                     and everything it sent was taken in (so every complete frame must have
 *                     been handled: the library keeps none buffered behind a quiet fd).
 *
 * The answers must not depend on SEED: that is part of the property.
 *
 * Copyright (c) the uartbridge authors. MIT licence (see uartbridge.h).
 */
#define _POSIX_C_SOURCE 200809L

#include "uartbridge.h"

#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static unsigned long rng_state;

static unsigned long rng(void) /* xorshift; determinism only matters per seed */
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static size_t chunk_size(size_t left)
{
    size_t n;
    switch (rng() % 4) {
    case 0: n = 1; break;
    case 1: n = 1 + rng() % 8; break;
    case 2: n = 1 + rng() % 600; break;
    default: n = left; break;
    }
    return n < left ? n : left;
}

static void hex(const unsigned char *p, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++)
        printf("%02x", p[i]);
}

static void print_frame(const ub_frame *f)
{
    switch (f->type) {
    case UB_T_HELLO: printf("hello:%u", f->version); break;
    case UB_T_READ: printf("read:%u", f->offset); break;
    case UB_T_WRITE: printf("write:%u:%u", f->offset, f->value); break;
    case UB_T_WRITE_N: printf("write_n:%u:", f->offset); hex(f->data, f->data_len); break;
    case UB_T_READ_N: printf("read_n:%u:%u", f->offset, f->value); break;
    case UB_T_SYNC: printf("sync:%lu", (unsigned long)f->u32); break;
    case UB_T_HELLO_REPLY:
        printf("hello_reply:%u:%lu:%u:", f->version, (unsigned long)f->u32, f->value);
        hex(f->data, f->data_len);
        break;
    case UB_T_READ_REPLY: printf("read_reply:%u:%u", f->offset, f->value); break;
    case UB_T_READ_N_REPLY:
        printf("read_n_reply:%u:", f->offset);
        hex(f->data, f->data_len);
        break;
    case UB_T_SYNC_REPLY: printf("sync_reply:%lu", (unsigned long)f->u32); break;
    case UB_T_IRQ: printf("irq:%u", f->value); break;
    case UB_T_TIME: printf("time:%llu", (unsigned long long)f->u64); break;
    case UB_T_DEADLINE:
        if (f->u64 == UB_NO_DEADLINE)
            printf("deadline:none");
        else
            printf("deadline:%llu", (unsigned long long)f->u64);
        break;
    case UB_T_ERROR: printf("error:%u:", f->value); hex(f->data, f->data_len); break;
    default: printf("?%u", f->type); break;
    }
    printf(" ");
}

/* Decode as a receiver does: bytes arrive in chunks into a buffer, complete frames are
   taken out after each chunk, and the buffer is compacted. */
static void run_frames(const unsigned char *in, size_t n)
{
    static unsigned char buf[2 * (2 + UB_MAX_FRAME_LEN) + 65536];
    size_t start = 0, end = 0, fed = 0;
    for (;;) {
        ub_frame f;
        long r = ub_parse_frame(buf + start, end - start, &f);
        if (r < 0) {
            printf("err:%ld\n", -r);
            return;
        }
        if (r > 0) {
            print_frame(&f);
            start += (size_t)r;
            continue;
        }
        if (fed == n)
            break;
        memmove(buf, buf + start, end - start);
        end -= start;
        start = 0;
        {
            size_t k = chunk_size(n - fed);
            if (k > sizeof buf - end)
                k = sizeof buf - end;
            memcpy(buf + end, in + fed, k);
            end += k;
            fed += k;
        }
    }
    printf("end:%lu\n", (unsigned long)(end - start));
}

static void on_irq(void *ctx, int level)
{
    (void)ctx;
    printf("irq:%d ", level);
}

static void serve(int fd, const unsigned char *in, size_t n, int close_at_end, int done)
{
    unsigned char hello[5];
    size_t got = 0, sent = 0;
    static const unsigned char want[5] = {0, 3, 1, 0, 1};
    while (got < 5) {
        ssize_t r = read(fd, hello + got, 5 - got);
        if (r <= 0)
            _exit(2);
        got += (size_t)r;
    }
    if (memcmp(hello, want, 5) != 0)
        _exit(3); /* the client's HELLO is wrong: the answer line will show it */
    while (sent < n) {
        size_t k = chunk_size(n - sent);
        ssize_t r = write(fd, in + sent, k);
        if (r <= 0)
            _exit(0); /* the client closed (it stopped at an error): fine */
        sent += (size_t)r;
        sched_yield();
    }
    if (close_at_end)
        shutdown(fd, SHUT_WR);
    else if (write(done, "d", 1) != 1)
        _exit(0); /* the client stopped at an error and is gone: fine */
    {
        char sink[256]; /* wait for the client to close */
        while (read(fd, sink, sizeof sink) > 0) {
        }
    }
    _exit(0);
}

static void run_client(const unsigned char *in, size_t n, int close_at_end)
{
    int sv[2], done[2], r, status, hello_ok, idle = 0;
    pid_t pid;
    ub_options o;
    ub_client *c;
    const ub_error *e;

    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0 || pipe(done) < 0) {
        perror("socketpair");
        exit(70);
    }
    fflush(stdout);
    pid = fork();
    if (pid < 0) {
        perror("fork");
        exit(70);
    }
    if (pid == 0) {
        close(sv[0]);
        close(done[0]);
        serve(sv[1], in, n, close_at_end, done[1]);
    }
    close(sv[1]);
    close(done[1]);
    ub_options_init(&o);
    o.timeout_ms = 10000;
    o.on_irq = on_irq;
    c = ub_new(&o);
    r = ub_attach_fd(c, sv[0]);
    hello_ok = r == UB_OK;
    while (r >= 0) {
        struct pollfd pfd[2];
        pfd[0].fd = ub_fd(c);
        pfd[1].fd = done[0];
        pfd[0].events = pfd[1].events = POLLIN;
        pfd[0].revents = pfd[1].revents = 0;
        if (poll(pfd, 2, 10000) <= 0) {
            printf("poll-timeout ");
            break;
        }
        if (pfd[0].revents) {
            r = ub_process(c);
        } else if (pfd[1].revents) {
            idle = 1; /* all was sent, and the fd has nothing more to read */
            break;
        }
    }
    if (hello_ok) {
        printf("hello:%u:%lu:", ub_server_version(c), (unsigned long)ub_capabilities(c));
        hex((const unsigned char *)ub_name(c), strlen(ub_name(c)));
        printf(" ");
    }
    e = ub_last_error(c);
    printf("level:%d status:%s:%d:", ub_irq(c), idle ? "idle" : ub_status_name(r),
           idle ? 0 : e->server_code);
    if (!idle)
        hex((const unsigned char *)e->server_message, e->server_message_len);
    ub_free(c);
    close(done[0]);
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        printf(" server-exit:%d", status);
    printf("\n");
}

int main(void)
{
    static char line[2 * 70000];
    static unsigned char bytes[70000];
    signal(SIGPIPE, SIG_IGN);
    while (fgets(line, sizeof line, stdin) != NULL) {
        char mode[16];
        unsigned long seed, close_at_end = 1;
        int used = 0;
        size_t n = 0;
        const char *p;
        if (sscanf(line, "%15s %lu %n", mode, &seed, &used) != 2 ||
            (strcmp(mode, "client") == 0 &&
             sscanf(line, "%15s %lu %lu %n", mode, &seed, &close_at_end, &used) != 3)) {
            printf("bad-request\n");
            fflush(stdout);
            continue;
        }
        rng_state = seed * 2654435761u + 1;
        for (p = line + used; p[0] && p[1] && p[0] != '\n' && n < sizeof bytes; p += 2) {
            unsigned v;
            if (sscanf(p, "%2x", &v) != 1)
                break;
            bytes[n++] = (unsigned char)v;
        }
        if (strcmp(mode, "frames") == 0)
            run_frames(bytes, n);
        else if (strcmp(mode, "client") == 0)
            run_client(bytes, n, close_at_end != 0);
        else
            printf("bad-mode\n");
        fflush(stdout);
    }
    return 0;
}
