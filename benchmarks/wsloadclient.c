/*
 * wsloadclient: a closed-loop load generator for WebSocket echo servers, and a
 * broadcast timer.
 *
 *   wsloadclient [-c conns] [-d seconds] [-s size] [-p pipeline] [-w warmup] [-v] host port
 *   wsloadclient -b rounds [-c conns] [-v] host port
 *
 * Echo mode (the default): one thread, epoll, N connections. Each connection does the
 * opening handshake (GET / with Upgrade: websocket; no extensions), then keeps P masked
 * text frames of `size` payload bytes in flight: it writes P at the start and the next
 * one each time an echo (an unmasked text frame of the same size) has come back.
 * Prints one line:  msgs_per_sec=... p50_us=... p99_us=... errors=...
 *
 * Broadcast mode (-b rounds): opens N connections and completes every handshake, then
 * for each round sends one text frame "broadcast" on the first connection; the server
 * is expected to send one message to every connection. The round ends when every
 * connection has received a whole frame. Prints one line:
 *   connections=... rounds=... median_ms=... max_ms=... errors=...
 *
 * Build: cc -O2 -o wsloadclient wsloadclient.c   (with loadcommon.h beside it)
 */
#define _GNU_SOURCE
#include <errno.h>
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
#include <time.h>
#include <unistd.h>

#include "loadcommon.h"

#define MAX_PIPELINE 64
#define MAX_SIZE 65535
#define HEAD_MAX 4096

enum { C_CONNECTING, C_HANDSHAKE, C_OPEN, C_DEAD };

struct conn {
    int fd;
    int state;
    int want_out;
    size_t head_len;           /* handshake answer bytes read so far */
    char *out;                 /* pending handshake bytes */
    size_t out_len, out_off;
    uint64_t to_write, written;   /* frame bytes */
    uint64_t received;            /* echo bytes after the handshake */
    uint64_t sent_ns[MAX_PIPELINE];
    unsigned head, count;
    /* broadcast mode: the frame being read */
    size_t frame_have, frame_need;
    unsigned char frame_hdr[10];
    uint64_t frames;
    int frame_counts;       /* the frame being read is a text frame (pings do not count) */
};

static uint64_t answered, errors;
static int measuring, draining, verbose, pipeline = 1;
static size_t payload_size = 64, out_frame_size, in_frame_size;
static char *msgbuf;
static size_t msgbuf_len;
static char request[512];
static size_t request_len;

static void set_events(int ep, struct conn *c, int want_out)
{
    struct epoll_event ev = {0};
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
        fprintf(stderr, "wsloadclient: fd %d: %s%s%s\n", c->fd, why, err ? ": " : "", err ? strerror(err) : "");
    errors++;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->state = C_DEAD;
}

/* Size of a frame header for a payload of n bytes (mask key included when masked). */
static size_t header_size(size_t n, int masked)
{
    return (n < 126 ? 2 : n < 65536 ? 4 : 10) + (masked ? 4 : 0);
}

static size_t write_header(unsigned char *p, size_t n, int masked)
{
    p[0] = 0x81;
    unsigned char bit = masked ? 0x80 : 0;
    size_t h;
    if (n < 126) {
        p[1] = bit | (unsigned char)n;
        h = 2;
    } else {
        p[1] = bit | 126;
        p[2] = (unsigned char)(n >> 8);
        p[3] = (unsigned char)n;
        h = 4;
    }
    if (masked) {
        memcpy(p + h, "\x37\xfa\x21\x3d", 4);
        h += 4;
    }
    return h;
}

static int flush_out(int ep, struct conn *c)
{
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return 0;
            kill_conn(ep, c, "write failed", errno);
            return -1;
        }
        c->out_off += (size_t)n;
    }
    while (c->to_write > 0) {
        size_t offset = (size_t)(c->written % out_frame_size);
        size_t len = msgbuf_len - offset;
        if (len > c->to_write)
            len = (size_t)c->to_write;
        ssize_t n = send(c->fd, msgbuf + offset, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                break;
            kill_conn(ep, c, "write failed", errno);
            return -1;
        }
        c->written += (uint64_t)n;
        c->to_write -= (uint64_t)n;
    }
    int want_out = c->to_write > 0 || c->out_off < c->out_len;
    if (want_out != c->want_out)
        set_events(ep, c, want_out);
    return 0;
}

static void queue_messages(struct conn *c, unsigned n, uint64_t t)
{
    for (unsigned i = 0; i < n; i++) {
        c->sent_ns[(c->head + c->count) % MAX_PIPELINE] = t;
        c->count++;
    }
    c->to_write += (uint64_t)n * out_frame_size;
}

static char rbuf[256 * 1024];
static int broadcast_mode;
static int handshaken;
static uint64_t broadcast_done; /* connections that got this round's frame */

/* Consume the handshake answer from rbuf[0..n); returns bytes used, or -1 on failure. */
static ssize_t read_handshake(int ep, struct conn *c, const char *data, size_t n)
{
    /* Look for the end of the head, byte by byte (it is short). */
    static const char end[] = "\r\n\r\n";
    size_t used = 0;
    while (used < n) {
        char ch = data[used++];
        if (c->head_len == 9 && ch != '1') {
            kill_conn(ep, c, "handshake refused", 0);
            return -1;
        }
        /* track the last 4 bytes in frame_hdr */
        memmove(c->frame_hdr, c->frame_hdr + 1, 3);
        c->frame_hdr[3] = (unsigned char)ch;
        c->head_len++;
        if (c->head_len > HEAD_MAX) {
            kill_conn(ep, c, "handshake answer too long", 0);
            return -1;
        }
        if (c->head_len >= 4 && memcmp(c->frame_hdr, end, 4) == 0) {
            c->state = C_OPEN;
            memset(c->frame_hdr, 0, sizeof c->frame_hdr);
            handshaken++;
            return (ssize_t)used;
        }
    }
    return (ssize_t)used;
}

/* Broadcast mode: count whole text frames (any size; control frames do not count). */
static void frame_done(struct conn *c)
{
    if (c->frame_counts) {
        c->frames++;
        broadcast_done++;
    }
}

static void count_frames(struct conn *c, const unsigned char *p, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if (c->frame_need == 0) { /* reading a header */
            c->frame_hdr[c->frame_have++] = p[i++];
            size_t len = (size_t)-2; /* not known yet */
            if (c->frame_have == 2 && (c->frame_hdr[1] & 0x7f) < 126)
                len = c->frame_hdr[1] & 0x7f;
            else if (c->frame_have == 4 && (c->frame_hdr[1] & 0x7f) == 126)
                len = ((size_t)c->frame_hdr[2] << 8) | c->frame_hdr[3];
            else if (c->frame_have == 10) {
                len = 0;
                for (int k = 2; k < 10; k++)
                    len = (len << 8) | c->frame_hdr[k];
            }
            if (len == (size_t)-2)
                continue;
            c->frame_have = 0;
            c->frame_counts = (c->frame_hdr[0] & 0x0f) == 1;
            if (len == 0)
                frame_done(c);
            else
                c->frame_need = len;
            continue;
        }
        size_t take = n - i < c->frame_need ? n - i : c->frame_need;
        i += take;
        c->frame_need -= take;
        if (c->frame_need == 0)
            frame_done(c);
    }
}

static int handle_read(int ep, struct conn *c)
{
    for (;;) {
        ssize_t n = recv(c->fd, rbuf, sizeof rbuf, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return 0;
            kill_conn(ep, c, "read failed", errno);
            return -1;
        }
        if (n == 0) {
            kill_conn(ep, c, "closed by the server", 0);
            return -1;
        }
        const char *data = rbuf;
        size_t size = (size_t)n;
        if (c->state == C_HANDSHAKE) {
            ssize_t used = read_handshake(ep, c, data, size);
            if (used < 0)
                return -1;
            data += used;
            size -= (size_t)used;
            if (c->state == C_OPEN && !broadcast_mode) {
                queue_messages(c, (unsigned)pipeline, now_ns());
                if (flush_out(ep, c) < 0)
                    return -1;
            }
        }
        if (size && c->state == C_OPEN) {
            if (broadcast_mode) {
                count_frames(c, (const unsigned char *)data, size);
            } else {
                uint64_t start = c->received, end = start + size;
                uint64_t first = (start + in_frame_size - 1) / in_frame_size * in_frame_size;
                for (uint64_t pos = first; pos < end; pos += in_frame_size)
                    if ((unsigned char)data[pos - start] != 0x81) {
                        kill_conn(ep, c, "not an unmasked text frame", 0);
                        return -1;
                    }
                unsigned done = (unsigned)(end / in_frame_size - start / in_frame_size);
                c->received = end;
                if (done) {
                    uint64_t t = now_ns();
                    for (unsigned i = 0; i < done && c->count; i++) {
                        if (measuring)
                            record_latency(t - c->sent_ns[c->head]);
                        c->head = (c->head + 1) % MAX_PIPELINE;
                        c->count--;
                    }
                    if (measuring)
                        answered += done;
                    if (!draining) {
                        queue_messages(c, done, t);
                        if (flush_out(ep, c) < 0)
                            return -1;
                    }
                }
            }
        }
        if ((size_t)n < sizeof rbuf)
            return 0;
    }
}

static void usage(void)
{
    fprintf(stderr, "usage: wsloadclient [-c conns] [-d s] [-s size] [-p pipeline] [-w warmup] [-b rounds] [-v] host port\n");
    exit(2);
}

#define MAX_OPENING 512

/* Start connecting one connection; returns 1 when under way, 0 on failure. */
static int open_conn(int ep, struct conn *c, const struct addrinfo *ai)
{
    c->state = C_DEAD;
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
        errors++;
        return 0;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0 && errno != EINPROGRESS) {
        errors++;
        close(fd);
        return 0;
    }
    c->fd = fd;
    c->state = C_CONNECTING;
    struct epoll_event ev = {0};
    ev.events = EPOLLOUT;
    ev.data.ptr = c;
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    c->want_out = 1;
    return 1;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    int nconns = 50, rounds = 0, opt;
    double duration = 5, warmup = 0;
    while ((opt = getopt(argc, argv, "c:d:s:p:w:b:v")) != -1) {
        switch (opt) {
        case 'c': nconns = atoi(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 's': payload_size = (size_t)atol(optarg); break;
        case 'p': pipeline = atoi(optarg); break;
        case 'w': warmup = atof(optarg); break;
        case 'b': rounds = atoi(optarg); broadcast_mode = 1; break;
        case 'v': verbose = 1; break;
        default: usage();
        }
    }
    if (argc - optind != 2 || nconns < 1 || pipeline < 1 || pipeline > MAX_PIPELINE || payload_size < 1 ||
        payload_size > MAX_SIZE)
        usage();
    const char *host = argv[optind], *port = argv[optind + 1];
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)nconns + 16) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    request_len = (size_t)snprintf(request, sizeof request,
                                   "GET / HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                                   host, port);
    /* The message: a masked text frame of payload_size bytes, MAX_PIPELINE copies. */
    out_frame_size = header_size(payload_size, 1) + payload_size;
    in_frame_size = header_size(payload_size, 0) + payload_size;
    msgbuf_len = out_frame_size * MAX_PIPELINE;
    msgbuf = malloc(msgbuf_len);
    for (int k = 0; k < MAX_PIPELINE; k++) {
        unsigned char *p = (unsigned char *)msgbuf + (size_t)k * out_frame_size;
        size_t h = write_header(p, payload_size, 1);
        const unsigned char *key = p + h - 4;
        for (size_t i = 0; i < payload_size; i++)
            p[h + i] = (unsigned char)('a' + i % 26) ^ key[i % 4];
    }

    struct addrinfo hints = {0}, *ai;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, port, &hints, &ai) != 0) {
        fprintf(stderr, "wsloadclient: cannot resolve %s\n", host);
        return 2;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct conn *conns = calloc((size_t)nconns, sizeof *conns);
    int alive = 0, opened = 0;
    /* Broadcast mode opens connections a batch at a time (at most MAX_OPENING without a
     * completed handshake), so that a slow handshake never times out in a long queue. */
    while (opened < nconns && (!broadcast_mode || alive - handshaken < MAX_OPENING))
        alive += open_conn(ep, &conns[opened++], ai);
    struct epoll_event events[512];
    uint64_t t_start = now_ns(), t_measure = t_start + (uint64_t)(warmup * 1e9);
    uint64_t t_end = t_measure + (uint64_t)(duration * 1e9), t_from = 0, t_stop = 0;
    uint64_t t_drain_end = t_end + 2000000000ull;
    double *round_ms = calloc((size_t)(rounds > 0 ? rounds : 1), sizeof(double));
    int round = -1;
    uint64_t round_start = 0, handshake_deadline = t_start + 60000000000ull;
    for (;;) {
        uint64_t t = now_ns();
        if (broadcast_mode) {
            while (opened < nconns && alive - handshaken < MAX_OPENING)
                alive += open_conn(ep, &conns[opened++], ai);
            if (round < 0 && opened == nconns && handshaken >= alive && alive > 0) {
                round = 0;
                broadcast_done = 0;
                round_start = now_ns();
                static unsigned char trigger[6 + 9];
                size_t h = write_header(trigger, 9, 1);
                for (int i = 0; i < 9; i++)
                    trigger[h + i] = (unsigned char)"broadcast"[i] ^ trigger[h - 4 + i % 4];
                send(conns[0].fd, trigger, h + 9, MSG_NOSIGNAL);
            } else if (round >= 0 && broadcast_done >= (uint64_t)alive) {
                round_ms[round] = (double)(now_ns() - round_start) / 1e6;
                if (verbose)
                    fprintf(stderr, "wsloadclient: round %d: %.1f ms\n", round, round_ms[round]);
                if (++round >= rounds)
                    break;
                usleep(200000);
                broadcast_done = 0;
                round_start = now_ns();
                static unsigned char trigger2[6 + 9];
                size_t h = write_header(trigger2, 9, 1);
                for (int i = 0; i < 9; i++)
                    trigger2[h + i] = (unsigned char)"broadcast"[i] ^ trigger2[h - 4 + i % 4];
                send(conns[0].fd, trigger2, h + 9, MSG_NOSIGNAL);
            } else if (t > handshake_deadline) {
                fprintf(stderr, "wsloadclient: timed out (handshaken=%d alive=%d got=%llu)\n", handshaken, alive,
                        (unsigned long long)broadcast_done);
                break;
            }
        } else {
            if (!measuring && !draining && t >= t_measure) {
                measuring = 1;
                t_from = t;
            }
            if (!draining && t >= t_end) {
                measuring = 0;
                draining = 1;
                t_stop = t;
            }
            if (draining) {
                int due = 0;
                for (int i = 0; i < nconns; i++)
                    if (conns[i].state == C_OPEN && conns[i].received < (conns[i].written + conns[i].to_write) / out_frame_size * in_frame_size)
                        due = 1;
                if (!due || t >= t_drain_end)
                    break;
            }
        }
        int n = epoll_wait(ep, events, 512, 10);
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
                if (err || (ev & (EPOLLERR | EPOLLHUP))) {
                    kill_conn(ep, c, "connect failed", err ? err : ECONNREFUSED);
                    alive--;
                    continue;
                }
                c->state = C_HANDSHAKE;
                c->out = request;
                c->out_len = request_len;
                c->out_off = 0;
                if (flush_out(ep, c) < 0)
                    alive--;
                continue;
            }
            if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP))
                if (handle_read(ep, c) < 0) {
                    alive--;
                    continue;
                }
            if ((ev & EPOLLOUT) && c->state != C_DEAD && flush_out(ep, c) < 0)
                alive--;
        }
        if (alive == 0)
            break;
    }
    freeaddrinfo(ai);
    if (broadcast_mode) {
        int done = round < 0 ? 0 : round;
        qsort(round_ms, (size_t)done, sizeof(double), cmp_double);
        printf("connections=%d rounds=%d median_ms=%.1f max_ms=%.1f errors=%llu\n", alive, done,
               done ? round_ms[done / 2] : 0.0, done ? round_ms[done - 1] : 0.0, (unsigned long long)errors);
        return done == rounds ? 0 : 1;
    }
    if (!t_stop)
        t_stop = now_ns();
    double measured = t_from && t_stop > t_from ? (double)(t_stop - t_from) / 1e9 : 0;
    printf("msgs_per_sec=%.0f p50_us=%.0f p99_us=%.0f errors=%llu\n", measured ? (double)answered / measured : 0.0,
           percentile_us(0.5), percentile_us(0.99), (unsigned long long)errors);
    return answered ? 0 : 1;
}
