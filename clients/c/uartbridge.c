/*
 * uartbridge.c - a C client for the uartbridge register bus (see uartbridge.h).
 *
 * Copyright (c) the uartbridge authors. MIT licence (the full text is in uartbridge.h).
 */
#define _POSIX_C_SOURCE 200809L

#include "uartbridge.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define WIRE_MAX (2 + UB_MAX_FRAME_LEN) /* the largest frame on the wire */
#define RX_SIZE (64 * 1024)
#define PROCESS_BUDGET (64 * 1024) /* bytes ub_process takes in per call */
#define NEEDED_CAPS (UB_CAP_BURST | UB_CAP_SYNC | UB_CAP_IRQ_EVENTS)

struct ub_client {
    int fd;                 /* -1 when not connected */
    int closed_status;      /* what calls return while not connected */
    int defer;              /* inside finish(): a failure is reported by the next call */
    int deferred;           /* that failure's status (the fd is shut down, still open) */
    int timeout_ms;
    unsigned spin_us;
    ub_irq_fn on_irq;
    void *irq_ctx;
    int level;              /* IRQ level as of the last frame received */
    unsigned long pending;  /* events received, not yet delivered */
    int delivering;
    uint32_t next_token;
    unsigned server_version;
    uint32_t capabilities;
    char name[UB_MAX_NAME_LEN + 1];
    ub_error err;
    size_t rx_start, rx_end; /* unparsed bytes are rx[rx_start..rx_end) */
    unsigned char rx[RX_SIZE];
};

/* ---- names ------------------------------------------------------------------------------ */

const char *ub_status_name(int status)
{
    switch (status) {
    case UB_OK: return "UB_OK";
    case UB_E_ARG: return "UB_E_ARG";
    case UB_E_SYSTEM: return "UB_E_SYSTEM";
    case UB_E_TIMEOUT: return "UB_E_TIMEOUT";
    case UB_E_CLOSED: return "UB_E_CLOSED";
    case UB_E_REFUSED: return "UB_E_REFUSED";
    case UB_E_PROTOCOL: return "UB_E_PROTOCOL";
    default: return "?";
    }
}

const char *ub_bus_error_name(int code)
{
    static const char *const names[] = {
        "?", "MALFORMED", "UNKNOWN_TYPE", "BAD_OFFSET", "VERSION_MISMATCH", "BUSY",
        "FRAME_TOO_LARGE", "PROTOCOL", "NOT_PERMITTED", "STALLED", "SHUTTING_DOWN", "INTERNAL"
    };
    if (code < 1 || code > UB_BUS_INTERNAL)
        return "?";
    return names[code];
}

/* ---- the frame decoder (pure) ----------------------------------------------------------- */

static unsigned get16(const unsigned char *p) { return ((unsigned)p[0] << 8) | p[1]; }

static uint32_t get32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static uint64_t get64(const unsigned char *p)
{
    return ((uint64_t)get32(p) << 32) | get32(p + 4);
}

/* Strict UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF), as Python's
   bytes.decode() checks it. */
static int utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t more;
        unsigned lo = 0x80, hi = 0xBF;
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xC2 && c <= 0xDF) {
            more = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            more = 2;
            if (c == 0xE0)
                lo = 0xA0;
            else if (c == 0xED)
                hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            more = 3;
            if (c == 0xF0)
                lo = 0x90;
            else if (c == 0xF4)
                hi = 0x8F;
        } else {
            return 0;
        }
        if (n - i <= more)
            return 0;
        if (s[i + 1] < lo || s[i + 1] > hi)
            return 0;
        for (size_t k = 2; k <= more; k++)
            if (s[i + k] < 0x80 || s[i + k] > 0xBF)
                return 0;
        i += more + 1;
    }
    return 1;
}

long ub_parse_frame(const void *buf, size_t len, ub_frame *f)
{
    const unsigned char *b = buf;
    const unsigned char *p;
    size_t length, n;

    if (len < 2)
        return 0;
    length = get16(b);
    if (length == 0)
        return -UB_BUS_MALFORMED;
    if (length > UB_MAX_FRAME_LEN)
        return -UB_BUS_FRAME_TOO_LARGE;
    if (len < 2 + length)
        return 0;
    memset(f, 0, sizeof *f);
    f->type = b[2];
    p = b + 3;
    n = length - 1; /* payload size */
    switch (f->type) {
    case UB_T_HELLO: /* bytes after the version are reserved and ignored (v1) */
        if (n < 2)
            return -UB_BUS_MALFORMED;
        f->version = get16(p);
        break;
    case UB_T_READ:
    case UB_T_WRITE:
    case UB_T_READ_REPLY:
        if (n != (f->type == UB_T_READ ? 1u : 2u))
            return -UB_BUS_MALFORMED;
        if (p[0] > 7)
            return -UB_BUS_BAD_OFFSET;
        f->offset = p[0];
        f->value = n == 2 ? p[1] : 0;
        break;
    case UB_T_WRITE_N:
    case UB_T_READ_N_REPLY:
        if (n < (f->type == UB_T_WRITE_N ? 2u : 1u))
            return -UB_BUS_MALFORMED;
        if (p[0] > 7)
            return -UB_BUS_BAD_OFFSET;
        f->offset = p[0];
        f->data = p + 1;
        f->data_len = n - 1;
        break;
    case UB_T_READ_N:
        if (n != 3)
            return -UB_BUS_MALFORMED;
        if (p[0] > 7)
            return -UB_BUS_BAD_OFFSET;
        f->offset = p[0];
        f->value = get16(p + 1);
        if (f->value < 1 || f->value > UB_MAX_BURST)
            return -UB_BUS_MALFORMED;
        break;
    case UB_T_SYNC:
    case UB_T_SYNC_REPLY:
        if (n != 4)
            return -UB_BUS_MALFORMED;
        f->u32 = get32(p);
        break;
    case UB_T_HELLO_REPLY:
        if (n < 7 || n > 7 + UB_MAX_NAME_LEN)
            return -UB_BUS_MALFORMED;
        f->version = get16(p);
        f->u32 = get32(p + 2);
        f->value = p[6];
        if (f->value > 1)
            return -UB_BUS_MALFORMED;
        f->data = p + 7;
        f->data_len = n - 7;
        if (!utf8_valid(f->data, f->data_len))
            return -UB_BUS_MALFORMED;
        break;
    case UB_T_TIME:
    case UB_T_DEADLINE:
        if (n != 8)
            return -UB_BUS_MALFORMED;
        f->u64 = get64(p);
        if (f->type == UB_T_TIME && f->u64 == UB_NO_DEADLINE)
            return -UB_BUS_MALFORMED; /* a time, not "none" */
        break;
    case UB_T_IRQ:
        if (n != 1)
            return -UB_BUS_MALFORMED;
        if (p[0] > 1)
            return -UB_BUS_MALFORMED;
        f->value = p[0];
        break;
    case UB_T_ERROR:
        if (n < 1)
            return -UB_BUS_MALFORMED;
        f->value = p[0];
        f->data = p + 1;
        f->data_len = n - 1;
        break;
    default:
        return -UB_BUS_UNKNOWN_TYPE;
    }
    return (long)(2 + length);
}

/* ---- errors ----------------------------------------------------------------------------- */

static void close_fd(ub_client *c)
{
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
    c->deferred = 0;
}

/* At the start of every call: a failure found at the end of the last one is reported now. */
static void take_deferred(ub_client *c)
{
    if (c->deferred)
        close_fd(c);
}

#if defined(__GNUC__)
__attribute__((format(printf, 4, 5)))
#endif
static int fail(ub_client *c, int status, int sys_errno, const char *fmt, ...)
{
    va_list ap;
    c->err.status = status;
    c->err.server_code = 0;
    c->err.sys_errno = sys_errno;
    c->err.server_message_len = 0;
    c->err.server_message[0] = '\0';
    va_start(ap, fmt);
    vsnprintf(c->err.message, sizeof c->err.message, fmt, ap);
    va_end(ap);
    if (status != UB_E_ARG) {
        if (c->defer && c->fd >= 0 && !c->deferred) {
            /* The call's own reply had arrived: it returns its result, and the next call
               reports this. Shut the socket down but keep the fd, so that a caller polling
               it wakes up (it reads as EOF) instead of waiting on a dead connection. */
            shutdown(c->fd, SHUT_RDWR);
            c->deferred = status;
        } else if (!c->deferred) {
            close_fd(c);
        }
        c->closed_status = status;
    }
    return status;
}

static int fail_errno(ub_client *c, const char *what)
{
    int e = errno;
    return fail(c, UB_E_SYSTEM, e, "%s: %s", what, strerror(e));
}

static int refused(ub_client *c, const ub_frame *f)
{
    size_t n = f->data_len < sizeof c->err.server_message - 1 ? f->data_len
                                                               : sizeof c->err.server_message - 1;
    int code = (int)f->value;
    char text[sizeof c->err.server_message];
    memcpy(text, f->data, n);
    text[n] = '\0';
    fail(c, UB_E_REFUSED, 0, "bus server error %s: %s", ub_bus_error_name(code), text);
    c->err.server_code = code;
    memcpy(c->err.server_message, f->data, n);
    c->err.server_message[n] = '\0';
    c->err.server_message_len = n;
    return UB_E_REFUSED;
}

static int not_connected(ub_client *c)
{
    if (c->closed_status == UB_E_CLOSED && c->err.status != UB_E_CLOSED)
        return fail(c, UB_E_CLOSED, 0, "bus connection is closed");
    return c->closed_status; /* the failure that closed it, as ub_last_error still says */
}

/* ---- time ------------------------------------------------------------------------------- */

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* A deadline in ns for timeout_ms (< 0: none, returned as -1). */
static int64_t deadline_after(int timeout_ms)
{
    return timeout_ms < 0 ? -1 : now_ns() + (int64_t)timeout_ms * 1000000;
}

/* poll()'s timeout until deadline, rounded up so a wait is never shorter than asked. */
static int poll_ms(int64_t deadline)
{
    int64_t left;
    if (deadline < 0)
        return -1;
    left = deadline - now_ns();
    if (left <= 0)
        return 0;
    left = (left + 999999) / 1000000;
    return left > 1000000000 ? 1000000000 : (int)left;
}

/* ---- receiving -------------------------------------------------------------------------- */

static void note_irq(ub_client *c, int level)
{
    /* The server sends only changes; a repeat is no change and no event. Because events
       alternate, pending + level describe the whole queue. */
    if (level != c->level) {
        c->level = level;
        c->pending++;
    }
}

/* Deliver queued events to the callback, oldest first (the queue alternates and ends at
   c->level, so the oldest of k pending is level ^ ((k - 1) & 1)). */
static void deliver(ub_client *c)
{
    if (c->delivering || c->on_irq == NULL)
        return;
    c->delivering = 1;
    while (c->pending > 0 && c->on_irq != NULL) {
        int level = c->level ^ (int)((c->pending - 1) & 1u);
        c->pending--;
        c->on_irq(c->irq_ctx, level);
    }
    c->delivering = 0;
}

/* Receive once into the buffer (the socket is non-blocking). Returns bytes received, 0 on EAGAIN, or a status (EOF, error: closed). */
static long rx_fill(ub_client *c)
{
    ssize_t r;
    if (c->rx_start == c->rx_end) {
        c->rx_start = c->rx_end = 0;
    } else if (RX_SIZE - c->rx_end < WIRE_MAX) {
        memmove(c->rx, c->rx + c->rx_start, c->rx_end - c->rx_start);
        c->rx_end -= c->rx_start;
        c->rx_start = 0;
    }
    do {
        r = recv(c->fd, c->rx + c->rx_end, RX_SIZE - c->rx_end, 0);
    } while (r < 0 && errno == EINTR);
    if (r > 0) {
        c->rx_end += (size_t)r;
        return r;
    }
    if (r == 0)
        return fail(c, UB_E_CLOSED, 0, "bus connection closed by the server");
    if (errno == EAGAIN || errno == EWOULDBLOCK)
        return 0;
    return fail_errno(c, "bus connection lost");
}

/* Parse the next buffered frame: 1 with *f (pointing into rx), 0 when none is complete, or a
   status (bad frame: closed). */
static int rx_next(ub_client *c, ub_frame *f)
{
    long r = ub_parse_frame(c->rx + c->rx_start, c->rx_end - c->rx_start, f);
    if (r == 0)
        return 0;
    if (r < 0)
        return fail(c, UB_E_PROTOCOL, 0, "bad frame from the server (%s)",
                    ub_bus_error_name((int)-r));
    c->rx_start += (size_t)r;
    return 1;
}

static const char *type_name(unsigned type)
{
    switch (type) {
    case UB_T_HELLO: return "HELLO";
    case UB_T_READ: return "READ";
    case UB_T_WRITE: return "WRITE";
    case UB_T_WRITE_N: return "WRITE_N";
    case UB_T_READ_N: return "READ_N";
    case UB_T_SYNC: return "SYNC";
    case UB_T_TIME: return "TIME";
    case UB_T_HELLO_REPLY: return "HELLO_REPLY";
    case UB_T_READ_REPLY: return "READ_REPLY";
    case UB_T_READ_N_REPLY: return "READ_N_REPLY";
    case UB_T_SYNC_REPLY: return "SYNC_REPLY";
    case UB_T_IRQ: return "IRQ";
    case UB_T_DEADLINE: return "DEADLINE";
    case UB_T_ERROR: return "ERROR";
    default: return "?";
    }
}

/* Take every complete buffered frame while no reply is expected: IRQ events are noted, an
   ERROR closes, anything else is a protocol error. Returns UB_OK or a status. */
static int rx_drain(ub_client *c)
{
    ub_frame f;
    int r;
    while (c->fd >= 0 && (r = rx_next(c, &f)) != 0) {
        if (r < 0)
            return r;
        if (f.type == UB_T_IRQ)
            note_irq(c, (int)f.value);
        else if (f.type == UB_T_ERROR)
            return refused(c, &f);
        else
            return fail(c, UB_E_PROTOCOL, 0, "unexpected %s from the server", type_name(f.type));
    }
    return c->fd >= 0 ? UB_OK : c->closed_status;
}

/* Wait for the next reply, which must be of type `type`; IRQ frames before it are noted.
   On success *f points into rx: use it before any other receive. */
static int wait_reply(ub_client *c, unsigned type, ub_frame *f)
{
    int64_t deadline = deadline_after(c->timeout_ms);
    for (;;) {
        int r;
        long got;
        while ((r = rx_next(c, f)) != 0) {
            if (r < 0)
                return r;
            if (f->type == UB_T_IRQ && type != UB_T_HELLO_REPLY) {
                note_irq(c, (int)f->value);
                continue;
            }
            if (f->type == UB_T_ERROR)
                return refused(c, f);
            if (f->type != type)
                return fail(c, UB_E_PROTOCOL, 0, "expected %s from the server, got %s",
                            type_name(type), type_name(f->type));
            return UB_OK;
        }
        if (c->spin_us > 0) {
            int64_t spin_end = now_ns() + (int64_t)c->spin_us * 1000;
            do {
                got = rx_fill(c);
                if (got != 0)
                    break;
            } while (now_ns() < spin_end);
            if (got < 0)
                return (int)got;
            if (got > 0)
                continue;
        }
        for (;;) {
            struct pollfd pfd;
            int ready;
            pfd.fd = c->fd;
            pfd.events = POLLIN;
            pfd.revents = 0;
            ready = poll(&pfd, 1, poll_ms(deadline));
            if (ready < 0 && errno == EINTR)
                continue;
            if (ready < 0)
                return fail_errno(c, "poll");
            if (ready == 0)
                return fail(c, UB_E_TIMEOUT, 0, "no %s from the server within %d ms",
                            type_name(type), c->timeout_ms);
            break;
        }
        got = rx_fill(c);
        if (got < 0)
            return (int)got;
    }
}

/* After a failed send the server may have said why before it closed: surface its ERROR. */
static int send_failed(ub_client *c, int e)
{
    ub_frame f;
    int r;
    if (rx_fill(c) > 0) {
        while ((r = rx_next(c, &f)) > 0) {
            if (f.type == UB_T_ERROR)
                return refused(c, &f);
        }
        if (r < 0)
            return r;
    }
    if (c->fd < 0)
        return c->closed_status;
    errno = e;
    return fail_errno(c, "bus connection lost while sending");
}

/* Send all of buf. While the socket is full, keep taking in what the server sends (IRQ
   events, an ERROR): a server whose output to us is not drained stops reading us. */
static int send_all(ub_client *c, const unsigned char *buf, size_t n)
{
    int64_t deadline = -2;
    while (n > 0) {
        ssize_t r = send(c->fd, buf, n, MSG_NOSIGNAL);
        if (r > 0) {
            buf += r;
            n -= (size_t)r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
            return send_failed(c, errno);
        if (deadline == -2)
            deadline = deadline_after(c->timeout_ms);
        for (;;) {
            struct pollfd pfd;
            int ready;
            pfd.fd = c->fd;
            pfd.events = POLLIN | POLLOUT;
            pfd.revents = 0;
            ready = poll(&pfd, 1, poll_ms(deadline));
            if (ready < 0 && errno == EINTR)
                continue;
            if (ready < 0)
                return fail_errno(c, "poll");
            if (ready == 0)
                return fail(c, UB_E_TIMEOUT, 0, "could not send to the server within %d ms",
                            c->timeout_ms);
            if (pfd.revents & POLLIN) {
                long got = rx_fill(c);
                int s;
                if (got < 0)
                    return (int)got;
                if ((s = rx_drain(c)) < 0)
                    return s;
            }
            break;
        }
    }
    return UB_OK;
}

/* End of every call: take in whatever complete frames the last receive left, then deliver.
   A failure here closes the connection; the call's own result still stands (its reply had
   arrived) and the next call reports the failure. */
static int finish(ub_client *c, int status)
{
    if (c->fd >= 0 && !c->deferred) {
        c->defer = 1;
        rx_drain(c);
        c->defer = 0;
    }
    deliver(c);
    return status;
}

/* ---- encoding --------------------------------------------------------------------------- */

static size_t put_header(unsigned char *p, unsigned type, size_t payload)
{
    size_t length = payload + 1;
    p[0] = (unsigned char)(length >> 8);
    p[1] = (unsigned char)length;
    p[2] = (unsigned char)type;
    return 3;
}

static void put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* ---- connecting ------------------------------------------------------------------------- */

void ub_options_init(ub_options *o)
{
    o->timeout_ms = 10000;
    o->spin_us = 100;
    o->on_irq = NULL;
    o->irq_ctx = NULL;
}

ub_client *ub_new(const ub_options *options)
{
    ub_options defaults;
    ub_client *c = calloc(1, sizeof *c);
    if (c == NULL)
        return NULL;
    if (options == NULL) {
        ub_options_init(&defaults);
        options = &defaults;
    }
    c->fd = -1;
    c->closed_status = UB_E_CLOSED;
    c->timeout_ms = options->timeout_ms;
    c->spin_us = options->spin_us;
    c->on_irq = options->on_irq;
    c->irq_ctx = options->irq_ctx;
    c->next_token = 1;
    c->err.status = UB_OK;
    return c;
}

void ub_close(ub_client *c)
{
    if (c == NULL || c->fd < 0)
        return;
    close_fd(c);
    c->closed_status = UB_E_CLOSED;
    c->err.status = UB_OK;
}

void ub_free(ub_client *c)
{
    if (c == NULL)
        return;
    close_fd(c);
    free(c);
}

static int set_flags(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return -1;
    fl = fcntl(fd, F_GETFD);
    if (fl < 0 || fcntl(fd, F_SETFD, fl | FD_CLOEXEC) < 0)
        return -1;
    return 0;
}

/* Wait for a non-blocking connect() to finish; 0 or -1 with errno set. */
static int connect_wait(int fd, int64_t deadline)
{
    struct pollfd pfd;
    int ready, soerr = 0;
    socklen_t len = sizeof soerr;
    pfd.fd = fd;
    pfd.events = POLLOUT;
    do {
        pfd.revents = 0;
        ready = poll(&pfd, 1, poll_ms(deadline));
    } while (ready < 0 && errno == EINTR);
    if (ready < 0)
        return -1;
    if (ready == 0) {
        errno = ETIMEDOUT;
        return -1;
    }
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) < 0)
        return -1;
    if (soerr != 0) {
        errno = soerr;
        return -1;
    }
    return 0;
}

static int connect_fd(int fd, const struct sockaddr *addr, socklen_t len, int64_t deadline)
{
    if (set_flags(fd) < 0)
        return -1;
    for (;;) {
        struct timespec pause = {0, 1000000};
        if (connect(fd, addr, len) == 0)
            return 0;
        if (errno == EINPROGRESS || errno == EINTR)
            return connect_wait(fd, deadline); /* TCP: completes in the background */
        /* A Unix socket whose listen backlog is full refuses at once with EAGAIN (it does
           not complete later): try again until the deadline. */
        if (errno != EAGAIN)
            return -1;
        if (deadline >= 0 && now_ns() >= deadline) {
            errno = ETIMEDOUT;
            return -1;
        }
        nanosleep(&pause, NULL);
    }
}

static int connect_unix(ub_client *c, const char *path, int64_t deadline)
{
    struct sockaddr_un sa;
    int fd;
    if (strlen(path) >= sizeof sa.sun_path)
        return fail(c, UB_E_ARG, 0, "bus socket path too long (%lu bytes, at most %lu): %s",
                    (unsigned long)strlen(path), (unsigned long)(sizeof sa.sun_path - 1), path);
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    strcpy(sa.sun_path, path);
    fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0)
        return fail_errno(c, "socket");
    if (connect_fd(fd, (const struct sockaddr *)&sa, sizeof sa, deadline) < 0) {
        int e = errno;
        close(fd);
        if (e == ENOENT)
            return fail(c, UB_E_SYSTEM, e, "no bus socket at %s (is the daemon running?)",
                        path);
        if (e == ETIMEDOUT)
            return fail(c, UB_E_TIMEOUT, e, "cannot connect to %s: timed out", path);
        return fail(c, UB_E_SYSTEM, e, "cannot connect to %s: %s", path, strerror(e));
    }
    c->fd = fd;
    return UB_OK;
}

static int connect_tcp(ub_client *c, const char *target, int64_t deadline)
{
    char host[256];
    const char *spec = target + 4, *colon = strrchr(spec, ':');
    const char *port;
    size_t hlen;
    struct addrinfo hints, *res, *ai;
    int rc, e = 0, one = 1;

    if (colon == NULL || colon[1] == '\0' || strspn(colon + 1, "0123456789") != strlen(colon + 1))
        return fail(c, UB_E_ARG, 0, "bad TCP bus target '%s': expected tcp:HOST:PORT", target);
    port = colon + 1;
    hlen = (size_t)(colon - spec);
    if (hlen >= 2 && spec[0] == '[' && spec[hlen - 1] == ']') {
        spec++;
        hlen -= 2;
    }
    if (hlen >= sizeof host)
        return fail(c, UB_E_ARG, 0, "bad TCP bus target '%s': host name too long", target);
    memcpy(host, spec, hlen);
    host[hlen] = '\0';
    if (hlen == 0)
        strcpy(host, "127.0.0.1");
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0)
        return fail(c, UB_E_SYSTEM, 0, "cannot resolve %s: %s", host, gai_strerror(rc));
    for (ai = res; ai != NULL; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0) {
            e = errno;
            continue;
        }
        if (connect_fd(fd, ai->ai_addr, ai->ai_addrlen, deadline) == 0) {
            /* Frames are small and each one is a whole message: no Nagle delay. */
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            c->fd = fd;
            break;
        }
        e = errno;
        close(fd);
    }
    freeaddrinfo(res);
    if (c->fd >= 0)
        return UB_OK;
    if (e == ETIMEDOUT)
        return fail(c, UB_E_TIMEOUT, e, "cannot connect to %s: timed out", target);
    return fail(c, UB_E_SYSTEM, e, "cannot connect to %s: %s", target, strerror(e));
}

/* HELLO on the connected c->fd. */
static int hello(ub_client *c)
{
    static const unsigned char frame[5] = {0, 3, UB_T_HELLO, 0, UB_PROTOCOL_VERSION};
    ub_frame f;
    int r;
    c->rx_start = c->rx_end = 0;
    c->closed_status = UB_E_CLOSED;
    if ((r = send_all(c, frame, sizeof frame)) < 0)
        return finish(c, r);
    if ((r = wait_reply(c, UB_T_HELLO_REPLY, &f)) < 0)
        return finish(c, r);
    if ((f.u32 & NEEDED_CAPS) != NEEDED_CAPS)
        return finish(c, fail(c, UB_E_PROTOCOL, 0,
                              "the server lacks capabilities this client needs (0x%lx of 0x%x)",
                              (unsigned long)f.u32, NEEDED_CAPS));
    c->server_version = f.version;
    c->capabilities = f.u32;
    memcpy(c->name, f.data, f.data_len);
    c->name[f.data_len] = '\0';
    /* No IRQ frame precedes HELLO_REPLY, so its level is the line's level now. */
    note_irq(c, (int)f.value);
    c->err.status = UB_OK;
    return finish(c, UB_OK);
}

int ub_attach_fd(ub_client *c, int fd)
{
    if (c == NULL)
        return UB_E_ARG;
    close_fd(c);
    if (fd < 0)
        return fail(c, UB_E_ARG, 0, "ub_attach_fd: no socket");
    if (set_flags(fd) < 0) {
        int e = errno;
        close(fd);
        return fail(c, UB_E_SYSTEM, e, "cannot set up the bus socket: %s", strerror(e));
    }
    c->fd = fd;
    return hello(c);
}

int ub_connect(ub_client *c, const char *target)
{
    int64_t deadline;
    int r;
    if (c == NULL)
        return UB_E_ARG;
    close_fd(c);
    if (target == NULL || target[0] == '\0')
        return fail(c, UB_E_ARG, 0, "no bus target given");
    deadline = deadline_after(c->timeout_ms);
    if (strncmp(target, "tcp:", 4) == 0)
        r = connect_tcp(c, target, deadline);
    else
        r = connect_unix(c, target, deadline);
    if (r < 0) {
        c->closed_status = r == UB_E_ARG ? UB_E_CLOSED : r;
        return r;
    }
    return hello(c);
}

/* ---- registers -------------------------------------------------------------------------- */

#define CHECK_CONNECTED(c)                                                                    \
    do {                                                                                      \
        if ((c) == NULL)                                                                      \
            return UB_E_ARG;                                                                  \
        take_deferred(c);                                                                     \
        if ((c)->fd < 0)                                                                      \
            return not_connected(c);                                                          \
    } while (0)

static int bad_offset(ub_client *c, unsigned offset)
{
    return fail(c, UB_E_ARG, 0, "register offset must be 0..7, got %u", offset);
}

int ub_read(ub_client *c, unsigned offset)
{
    unsigned char frame[4];
    ub_frame f;
    int r;
    CHECK_CONNECTED(c);
    if (offset > 7)
        return bad_offset(c, offset);
    frame[put_header(frame, UB_T_READ, 1)] = (unsigned char)offset;
    if ((r = send_all(c, frame, sizeof frame)) < 0 || (r = wait_reply(c, UB_T_READ_REPLY, &f)) < 0)
        return finish(c, r);
    if (f.offset != offset)
        return finish(c, fail(c, UB_E_PROTOCOL, 0, "READ_REPLY for offset %u, asked %u",
                              f.offset, offset));
    return finish(c, (int)f.value);
}

int ub_read_regs(ub_client *c, const unsigned char *offsets, size_t n, unsigned char *values)
{
    unsigned char frames[256 * 4];
    size_t i;
    int r;
    CHECK_CONNECTED(c);
    if (n > 256 || (n > 0 && (offsets == NULL || values == NULL)))
        return fail(c, UB_E_ARG, 0, "ub_read_regs: at most 256 offsets, and buffers for them");
    if (n == 0)
        return UB_OK;
    for (i = 0; i < n; i++) {
        if (offsets[i] > 7)
            return bad_offset(c, offsets[i]);
        frames[4 * i + put_header(frames + 4 * i, UB_T_READ, 1)] = offsets[i];
    }
    if ((r = send_all(c, frames, 4 * n)) < 0)
        return finish(c, r);
    for (i = 0; i < n; i++) {
        ub_frame f;
        if ((r = wait_reply(c, UB_T_READ_REPLY, &f)) < 0)
            return finish(c, r);
        if (f.offset != offsets[i])
            return finish(c, fail(c, UB_E_PROTOCOL, 0, "READ_REPLY for offset %u, asked %u",
                                  f.offset, offsets[i]));
        values[i] = (unsigned char)f.value;
    }
    return finish(c, UB_OK);
}

int ub_write(ub_client *c, unsigned offset, unsigned value)
{
    unsigned char frame[5];
    size_t h;
    CHECK_CONNECTED(c);
    if (offset > 7)
        return bad_offset(c, offset);
    if (value > 0xFF)
        return fail(c, UB_E_ARG, 0, "register value must be 0..255, got %u", value);
    h = put_header(frame, UB_T_WRITE, 2);
    frame[h] = (unsigned char)offset;
    frame[h + 1] = (unsigned char)value;
    return finish(c, send_all(c, frame, sizeof frame));
}

int ub_write_n(ub_client *c, unsigned offset, const void *data, size_t n)
{
    unsigned char frame[WIRE_MAX];
    const unsigned char *p = data;
    CHECK_CONNECTED(c);
    if (offset > 7)
        return bad_offset(c, offset);
    if (n > 0 && data == NULL)
        return fail(c, UB_E_ARG, 0, "ub_write_n: no data");
    while (n > 0) {
        size_t chunk = n < UB_MAX_BURST ? n : UB_MAX_BURST;
        size_t h = put_header(frame, UB_T_WRITE_N, chunk + 1);
        int r;
        frame[h] = (unsigned char)offset;
        memcpy(frame + h + 1, p, chunk);
        if ((r = send_all(c, frame, h + 1 + chunk)) < 0)
            return finish(c, r);
        p += chunk;
        n -= chunk;
    }
    return finish(c, UB_OK);
}

long ub_read_n(ub_client *c, unsigned offset, void *buf, size_t n)
{
    unsigned char *out = buf;
    size_t total = 0;
    CHECK_CONNECTED(c);
    if (offset > 7)
        return bad_offset(c, offset);
    if (n > 0 && buf == NULL)
        return fail(c, UB_E_ARG, 0, "ub_read_n: no buffer");
    while (n > 0) {
        unsigned char frame[6];
        size_t count = n < UB_MAX_BURST ? n : UB_MAX_BURST;
        size_t h = put_header(frame, UB_T_READ_N, 3);
        ub_frame f;
        int r;
        frame[h] = (unsigned char)offset;
        frame[h + 1] = (unsigned char)(count >> 8);
        frame[h + 2] = (unsigned char)count;
        if ((r = send_all(c, frame, sizeof frame)) < 0 ||
            (r = wait_reply(c, UB_T_READ_N_REPLY, &f)) < 0)
            return finish(c, r);
        if (f.offset != offset || f.data_len > count)
            return finish(c, fail(c, UB_E_PROTOCOL, 0,
                                  "READ_N_REPLY of %lu bytes at offset %u for %lu at %u",
                                  (unsigned long)f.data_len, f.offset, (unsigned long)count,
                                  offset));
        memcpy(out + total, f.data, f.data_len);
        total += f.data_len;
        n -= count;
        if (f.data_len < count)
            break;
    }
    return finish(c, (long)total);
}

int ub_sync(ub_client *c)
{
    unsigned char frame[7];
    uint32_t token;
    ub_frame f;
    int r;
    CHECK_CONNECTED(c);
    token = c->next_token++;
    put32(frame + put_header(frame, UB_T_SYNC, 4), token);
    if ((r = send_all(c, frame, sizeof frame)) < 0 || (r = wait_reply(c, UB_T_SYNC_REPLY, &f)) < 0)
        return finish(c, r);
    if (f.u32 != token)
        return finish(c, fail(c, UB_E_PROTOCOL, 0, "SYNC token mismatch: sent %lu, got %lu",
                              (unsigned long)token, (unsigned long)f.u32));
    return finish(c, UB_OK);
}

/* ---- events ----------------------------------------------------------------------------- */

int ub_process(ub_client *c)
{
    unsigned long before;
    size_t taken = 0;
    int r = UB_OK;
    if (c == NULL)
        return UB_E_ARG;
    before = c->pending;
    take_deferred(c);
    if (c->fd < 0) {
        deliver(c);
        return not_connected(c);
    }
    while (taken < PROCESS_BUDGET) {
        long got = rx_fill(c);
        if (got <= 0) {
            r = (int)got;
            break;
        }
        taken += (size_t)got;
        if ((r = rx_drain(c)) < 0)
            break;
    }
    if (r == UB_OK)
        r = (int)(c->pending - before);
    /* Counted before delivery: the callback may take events (and nested calls add some). */
    deliver(c);
    return r;
}

int ub_wait_irq(ub_client *c, int timeout_ms)
{
    int64_t deadline = deadline_after(timeout_ms);
    int r;
    if (c == NULL)
        return UB_E_ARG;
    if ((r = ub_process(c)) < 0)
        return r;
    while (!c->level) {
        struct pollfd pfd;
        int ready;
        pfd.fd = c->fd;
        pfd.events = POLLIN;
        pfd.revents = 0;
        ready = poll(&pfd, 1, poll_ms(deadline));
        if (ready < 0 && errno == EINTR)
            continue;
        if (ready < 0)
            return fail_errno(c, "poll");
        if (ready == 0)
            break;
        if ((r = ub_process(c)) < 0)
            return r;
    }
    return c->level;
}

int ub_fd(const ub_client *c) { return c == NULL ? -1 : c->fd; }

int ub_irq(const ub_client *c) { return c == NULL ? 0 : c->level; }

void ub_set_irq_callback(ub_client *c, ub_irq_fn on_irq, void *ctx)
{
    if (c == NULL)
        return;
    c->on_irq = on_irq;
    c->irq_ctx = ctx;
}

unsigned long ub_pending_irqs(const ub_client *c) { return c == NULL ? 0 : c->pending; }

int ub_next_irq(ub_client *c)
{
    int level;
    if (c == NULL || c->pending == 0)
        return -1;
    level = c->level ^ (int)((c->pending - 1) & 1u);
    c->pending--;
    return level;
}

int ub_connected(const ub_client *c) { return c != NULL && c->fd >= 0 && !c->deferred; }

unsigned ub_server_version(const ub_client *c) { return c == NULL ? 0 : c->server_version; }

uint32_t ub_capabilities(const ub_client *c) { return c == NULL ? 0 : c->capabilities; }

const char *ub_name(const ub_client *c) { return c == NULL ? "" : c->name; }

const ub_error *ub_last_error(const ub_client *c)
{
    static const ub_error none = {UB_E_ARG, 0, 0, 0, "", "no client"};
    return c == NULL ? &none : &c->err;
}
