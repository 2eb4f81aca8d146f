/* Raw baselines for the vmemdev benchmarks, compiled at bench time with cc
 * (bench/native.py) and loaded with ctypes. Timed inside C with
 * CLOCK_MONOTONIC so nothing of Python is in the raw numbers.
 *
 * Functions return elapsed nanoseconds (>= 0) or -errno. The echo loops
 * are the far side of the ping-pong baselines, run in a separate process. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* fallocate(mode) over [offset, offset + length) in calls of `chunk` bytes
 * (chunk 0: one call), exactly as the daemon would issue them. */
static int64_t falloc_loop(int fd, int mode, uint64_t offset, uint64_t length, uint64_t chunk)
{
    int64_t t0 = now_ns();
    uint64_t pos = offset, end = offset + length;
    if (chunk == 0)
        chunk = length;
    while (pos < end) {
        uint64_t n = end - pos < chunk ? end - pos : chunk;
        if (fallocate(fd, mode, (off_t)pos, (off_t)n) < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        pos += n;
    }
    return now_ns() - t0;
}

int64_t bh_punch(int fd, uint64_t offset, uint64_t length, uint64_t chunk)
{
    return falloc_loop(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length, chunk);
}

int64_t bh_fallocate(int fd, uint64_t offset, uint64_t length, uint64_t chunk)
{
    return falloc_loop(fd, 0, offset, length, chunk);
}

struct populate_job {
    char *addr;
    size_t length;
    int rc;
};

static void *populate_thread(void *arg)
{
    struct populate_job *job = arg;
    job->rc = 0;
    while (madvise(job->addr, job->length, MADV_POPULATE_WRITE) < 0) {
        if (errno != EINTR) {
            job->rc = -errno;
            break;
        }
    }
    return NULL;
}

/* MADV_POPULATE_WRITE over a shared mapping, split into nthreads (1..16)
 * page-aligned slices; slice 0 runs in the calling thread. */
int64_t bh_populate(uint64_t addr, uint64_t length, int nthreads)
{
    pthread_t threads[16];
    struct populate_job jobs[16];
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE), slice, pos = 0;
    int i, n = 0, started, rc = 0;
    int64_t t0;

    if (nthreads < 1 || nthreads > 16)
        return -EINVAL;
    slice = (length / (uint64_t)nthreads + page - 1) / page * page;
    for (i = 0; i < nthreads && pos < length; i++, n++) {
        jobs[i].addr = (char *)(uintptr_t)(addr + pos);
        jobs[i].length = (size_t)(length - pos < slice ? length - pos : slice);
        jobs[i].rc = 0;
        pos += jobs[i].length;
    }
    t0 = now_ns();
    for (i = 1; i < n; i++)
        if (pthread_create(&threads[i], NULL, populate_thread, &jobs[i]) != 0) {
            rc = -EAGAIN;
            break;
        }
    started = i;
    if (n > 0)
        populate_thread(&jobs[0]);
    for (i = 1; i < started; i++)
        pthread_join(threads[i], NULL);
    if (rc < 0)
        return rc;
    for (i = 0; i < n; i++)
        if (jobs[i].rc < 0)
            rc = jobs[i].rc;
    return rc < 0 ? rc : now_ns() - t0;
}

/* Far side of the eventfd ping-pong: wait for `in_fd` (blocking read),
 * answer on `out_fd`. Runs until read fails (the fds go away). */
int bh_eventfd_echo(int in_fd, int out_fd)
{
    uint64_t v, one = 1;
    int flags = fcntl(in_fd, F_GETFL);
    fcntl(in_fd, F_SETFL, flags & ~O_NONBLOCK);
    for (;;) {
        if (read(in_fd, &v, 8) != 8) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (write(out_fd, &one, 8) != 8)
            return -errno;
    }
}

/* Far side of the Unix-socket echo: read exactly `size` bytes, send them
 * back, until EOF. */
int bh_socket_echo(int fd, int size)
{
    char buf[4096];
    if (size <= 0 || size > (int)sizeof(buf))
        return -EINVAL;
    for (;;) {
        int got = 0, sent = 0;
        while (got < size) {
            ssize_t n = recv(fd, buf + got, (size_t)(size - got), 0);
            if (n == 0)
                return 0;
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                return -errno;
            }
            got += (int)n;
        }
        while (sent < size) {
            ssize_t n = send(fd, buf + sent, (size_t)(size - sent), MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                return -errno;
            }
            sent += (int)n;
        }
    }
}
