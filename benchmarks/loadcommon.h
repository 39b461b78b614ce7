/*
 * loadcommon.h: what the load clients share: a monotonic clock in nanoseconds and the
 * latency histogram (1 us buckets up to 200 ms, 1 ms buckets beyond, up to 120 s).
 */
#ifndef LOADCOMMON_H
#define LOADCOMMON_H

#include <stdint.h>
#include <time.h>

#define FINE_BUCKETS 200000   /* 1 us each: 0 .. 200 ms */
#define COARSE_BUCKETS 120000 /* 1 ms each: 200 ms .. 120.2 s */

static uint64_t fine_hist[FINE_BUCKETS];
static uint64_t coarse_hist[COARSE_BUCKETS + 1]; /* last one: overflow */
static uint64_t hist_total;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void record_latency(uint64_t ns)
{
    uint64_t us = ns / 1000;
    if (us < FINE_BUCKETS)
        fine_hist[us]++;
    else {
        uint64_t ms = (us - FINE_BUCKETS) / 1000;
        coarse_hist[ms < COARSE_BUCKETS ? ms : COARSE_BUCKETS]++;
    }
    hist_total++;
}

/* The latency (us, lower bucket edge) below which a fraction q of the samples fall. */
static double percentile_us(double q)
{
    if (hist_total == 0)
        return 0.0;
    uint64_t rank = (uint64_t)(q * (double)hist_total);
    if (rank >= hist_total)
        rank = hist_total - 1;
    uint64_t seen = 0;
    for (uint64_t i = 0; i < FINE_BUCKETS; i++) {
        seen += fine_hist[i];
        if (seen > rank)
            return (double)i;
    }
    for (uint64_t i = 0; i <= COARSE_BUCKETS; i++) {
        seen += coarse_hist[i];
        if (seen > rank)
            return (double)(FINE_BUCKETS + i * 1000);
    }
    return (double)(FINE_BUCKETS + (uint64_t)COARSE_BUCKETS * 1000);
}

#endif
