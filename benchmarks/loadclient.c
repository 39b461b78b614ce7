/*
 * loadclient: a closed-loop load generator for line-echo servers.
 *
 * One thread, epoll, N TCP connections. Every connection keeps P messages in
 * flight: it writes P messages at the start, and each time one echo has fully
 * come back it writes the next one. Every message is the same size (its last
 * byte is '\n'), so answers are counted by bytes received, and the oldest
 * outstanding send time of the connection is the send time of the answer.
 *
 *   loadclient [-c conns] [-d seconds] [-s size] [-p pipeline] [-w warmup] [-v] host port
 *
 * Prints one line:  msgs_per_sec=... p50_us=... p99_us=... errors=...
 * (-v adds details on stderr). Exits 1 when nothing was answered.
 *
 * Only messages answered during the measured window (after the warm-up)
 * count. When the time is up, no new messages are sent and the answers still
 * due are awaited (up to 2 s) before the connections are closed, so that the
 * server never sees a client vanish with data in flight. Latency is send time to answer time, in a histogram with 1 us
 * buckets up to 200 ms and 1 ms buckets beyond (up to 120 s).
 *
 * Build: cc -O2 -o loadclient loadclient.c   (with loadcommon.h beside it)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "loadcommon.h"

#define MAX_PIPELINE 64
#define MAX_SIZE (1024 * 1024)

enum { C_CONNECTING, C_OPEN, C_DEAD };

struct conn {
    int fd;
    int state;
    int want_out;           /* EPOLLOUT currently requested */
    uint64_t to_write;      /* bytes queued but not yet written */
    uint64_t written;       /* bytes written in total */
    uint64_t received;      /* bytes received in total */
    uint64_t sent_ns[MAX_PIPELINE]; /* ring: send time of each outstanding message */
    unsigned head, count;   /* ring start and length */
};


static char *msgbuf;       /* MAX_PIPELINE copies of the message, back to back */
static size_t msgbuf_len;
static size_t msg_size = 64;
static int pipeline = 1;
static int verbose;
static uint64_t errors;
static uint64_t answered; /* answers counted in the measured window */
static int measuring;
static int draining; /* time is up: no new messages, wait for the answers still due */

static void usage(void)
{
    fprintf(stderr,
            "usage: loadclient [-c conns] [-d seconds] [-s size] [-p pipeline] [-w warmup] [-v] host port\n"
            "  -c  connections (default 50)\n"
            "  -d  measured seconds (default 5)\n"
            "  -s  message size in bytes, the last one '\\n' (default 64)\n"
            "  -p  messages in flight per connection, 1..%d (default 1)\n"
            "  -w  warm-up seconds before measuring (default 0)\n"
            "  -v  details on stderr\n",
            MAX_PIPELINE);
    exit(2);
}

static void set_events(int ep, struct conn *c, int want_out)
{
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN | (want_out ? EPOLLOUT : 0);
    ev.data.ptr = c;
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) == 0)
        c->want_out = want_out;
}

static void kill_conn(int ep, struct conn *c, const char *why, int err)
{
    if (c->state == C_DEAD)
        return;
    if (verbose)
        fprintf(stderr, "loadclient: connection fd %d: %s%s%s\n", c->fd, why, err ? ": " : "",
                err ? strerror(err) : "");
    errors++;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->state = C_DEAD;
}

/* Queue n new messages (send time: now) and write as much as the socket takes. */
static void queue_messages(struct conn *c, unsigned n, uint64_t t)
{
    for (unsigned i = 0; i < n; i++) {
        c->sent_ns[(c->head + c->count) % MAX_PIPELINE] = t;
        c->count++;
    }
    c->to_write += (uint64_t)n * msg_size;
}

/* Returns 0, or -1 after the connection died. */
static int flush_writes(int ep, struct conn *c)
{
    while (c->to_write > 0) {
        size_t offset = (size_t)(c->written % msg_size);
        size_t len = msgbuf_len - offset;
        if (len > c->to_write)
            len = (size_t)c->to_write;
        ssize_t n = send(c->fd, msgbuf + offset, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            kill_conn(ep, c, "write failed", errno);
            return -1;
        }
        c->written += (uint64_t)n;
        c->to_write -= (uint64_t)n;
    }
    int want_out = c->to_write > 0;
    if (want_out != c->want_out)
        set_events(ep, c, want_out);
    return 0;
}

static char rbuf[256 * 1024];

/* Returns 0, or -1 after the connection died. */
static int handle_read(int ep, struct conn *c)
{
    for (;;) {
        ssize_t n = recv(c->fd, rbuf, sizeof rbuf, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            kill_conn(ep, c, "read failed", errno);
            return -1;
        }
        if (n == 0) {
            kill_conn(ep, c, "closed by the server", 0);
            return -1;
        }
        /* Each message ends with '\n' at offset msg_size-1: check those bytes. */
        uint64_t start = c->received;
        uint64_t end = start + (uint64_t)n;
        uint64_t first_nl = start - start % msg_size + msg_size - 1;
        for (uint64_t pos = first_nl; pos < end; pos += msg_size) {
            if (rbuf[pos - start] != '\n') {
                kill_conn(ep, c, "echo does not match what was sent", 0);
                return -1;
            }
        }
        if (end > c->written) {
            kill_conn(ep, c, "server sent more than it was sent", 0);
            return -1;
        }
        unsigned done = (unsigned)(end / msg_size - start / msg_size);
        c->received = end;
        if (done > 0) {
            uint64_t t = now_ns();
            for (unsigned i = 0; i < done; i++) {
                if (measuring)
                    record_latency(t - c->sent_ns[c->head]);
                c->head = (c->head + 1) % MAX_PIPELINE;
                c->count--;
            }
            if (measuring)
                answered += done;
            if (!draining) {
                queue_messages(c, done, t);
                if (flush_writes(ep, c) < 0)
                    return -1;
            }
        }
        if ((size_t)n < sizeof rbuf)
            return 0; /* most likely drained; level-triggered epoll tells us otherwise */
    }
}

int main(int argc, char **argv)
{
    int nconns = 50;
    double duration = 5.0, warmup = 0.0;
    int opt;
    while ((opt = getopt(argc, argv, "c:d:s:p:w:v")) != -1) {
        switch (opt) {
        case 'c': nconns = atoi(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 's': msg_size = (size_t)atol(optarg); break;
        case 'p': pipeline = atoi(optarg); break;
        case 'w': warmup = atof(optarg); break;
        case 'v': verbose = 1; break;
        default: usage();
        }
    }
    if (argc - optind != 2 || nconns < 1 || duration <= 0 || warmup < 0 || msg_size < 1 || msg_size > MAX_SIZE ||
        pipeline < 1 || pipeline > MAX_PIPELINE)
        usage();
    const char *host = argv[optind], *port = argv[optind + 1];

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)nconns + 16) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    msgbuf_len = msg_size * MAX_PIPELINE;
    msgbuf = malloc(msgbuf_len);
    if (!msgbuf) {
        perror("malloc");
        return 2;
    }
    for (size_t i = 0; i < msgbuf_len; i++) {
        size_t k = i % msg_size;
        msgbuf[i] = k == msg_size - 1 ? '\n' : (char)('a' + k % 26);
    }

    struct addrinfo hints, *ai;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int gai = getaddrinfo(host, port, &hints, &ai);
    if (gai != 0) {
        fprintf(stderr, "loadclient: %s:%s: %s\n", host, port, gai_strerror(gai));
        return 2;
    }

    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) {
        perror("epoll_create1");
        return 2;
    }
    struct conn *conns = calloc((size_t)nconns, sizeof *conns);
    if (!conns) {
        perror("calloc");
        return 2;
    }
    int alive = 0;
    for (int i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        c->state = C_DEAD;
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) {
            if (verbose)
                fprintf(stderr, "loadclient: socket: %s\n", strerror(errno));
            errors++;
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        c->fd = fd;
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0 && errno != EINPROGRESS) {
            if (verbose)
                fprintf(stderr, "loadclient: connect: %s\n", strerror(errno));
            errors++;
            close(fd);
            continue;
        }
        c->state = C_CONNECTING;
        struct epoll_event ev;
        memset(&ev, 0, sizeof ev);
        ev.events = EPOLLOUT;
        ev.data.ptr = c;
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
            perror("epoll_ctl");
            return 2;
        }
        c->want_out = 1;
        alive++;
    }
    freeaddrinfo(ai);

    struct rusage ru0, ru1;
    memset(&ru0, 0, sizeof ru0);
    memset(&ru1, 0, sizeof ru1);
    uint64_t t_start = now_ns();
    uint64_t t_measure = t_start + (uint64_t)(warmup * 1e9);
    uint64_t t_end = t_measure + (uint64_t)(duration * 1e9);
    uint64_t t_measured_from = 0;
    if (warmup == 0.0) {
        t_measured_from = t_start;
        measuring = 1;
        getrusage(RUSAGE_SELF, &ru0);
    }

    struct epoll_event events[512];
    uint64_t t_stop = 0, t_drain_end = t_end + 2000000000ull;
    for (;;) {
        uint64_t t = now_ns();
        if (!measuring && !draining && t >= t_measure) {
            measuring = 1;
            t_measured_from = t;
            getrusage(RUSAGE_SELF, &ru0);
        }
        if (!draining && t >= t_end) {
            measuring = 0;
            draining = 1;
            t_stop = t;
            getrusage(RUSAGE_SELF, &ru1);
        }
        if (draining) {
            int due = 0;
            for (int i = 0; i < nconns; i++)
                if (conns[i].state == C_OPEN && conns[i].received < conns[i].written + conns[i].to_write)
                    due = 1;
            if (!due || t >= t_drain_end)
                break;
        }
        uint64_t next = draining ? t_drain_end : measuring ? t_end : t_measure;
        int timeout_ms = (int)((next - t) / 1000000) + 1;
        int n = epoll_wait(ep, events, 512, timeout_ms);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_wait");
            return 2;
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            uint32_t ev = events[i].events;
            if (c->state == C_DEAD)
                continue;
            if (c->state == C_CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err != 0 || (ev & (EPOLLERR | EPOLLHUP))) {
                    kill_conn(ep, c, "connect failed", err ? err : ECONNREFUSED);
                    alive--;
                    continue;
                }
                c->state = C_OPEN;
                queue_messages(c, (unsigned)pipeline, now_ns());
                c->want_out = 1; /* force set_events in flush_writes if nothing remains */
                if (flush_writes(ep, c) < 0) {
                    alive--;
                    continue;
                }
                if (!c->want_out)
                    continue;
                set_events(ep, c, 1);
                continue;
            }
            if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                if (handle_read(ep, c) < 0) {
                    alive--;
                    continue;
                }
            }
            if ((ev & EPOLLOUT) && c->state == C_OPEN && flush_writes(ep, c) < 0)
                alive--;
        }
        if (alive == 0)
            break;
    }
    if (!draining) { /* every connection died early */
        t_stop = now_ns();
        getrusage(RUSAGE_SELF, &ru1);
    }
    double measured_s = t_measured_from && t_stop > t_measured_from ? (double)(t_stop - t_measured_from) / 1e9 : 0.0;
    double rate = measured_s > 0 ? (double)answered / measured_s : 0.0;
    printf("msgs_per_sec=%.0f p50_us=%.0f p99_us=%.0f errors=%llu\n", rate, percentile_us(0.50),
           percentile_us(0.99), (unsigned long long)errors);
    fflush(stdout);
    if (verbose) {
        double cpu = (double)(ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec + ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) +
                     (double)(ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec + ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) /
                         1e6;
        int open_at_end = 0;
        for (int i = 0; i < nconns; i++)
            open_at_end += conns[i].state == C_OPEN;
        fprintf(stderr,
                "loadclient: answered=%llu measured_s=%.3f p90_us=%.0f p999_us=%.0f client_cpu_pct=%.0f "
                "open_connections=%d\n",
                (unsigned long long)answered, measured_s, percentile_us(0.90), percentile_us(0.999),
                measured_s > 0 ? 100.0 * cpu / measured_s : 0.0, open_at_end);
    }
    for (int i = 0; i < nconns; i++)
        if (conns[i].state != C_DEAD)
            close(conns[i].fd);
    return answered > 0 ? 0 : 1;
}
