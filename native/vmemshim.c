/* See vmemshim.h. Kept minimal: policy and argument checks for callers live
 * in vmemdev/native.py; these checks only keep the syscalls well-defined. */
#define _GNU_SOURCE
#include "vmemshim.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/kcmp.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "vmemshim writes virtio split-ring fields in host order: little-endian hosts only"
#endif

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14; older libc headers lack it */
#endif

/* Retry a syscall returning -1/errno on EINTR. All users are idempotent. */
#define RETRY(expr) ({ int r_; do r_ = (expr); while (r_ < 0 && errno == EINTR); \
                       r_ < 0 ? -errno : 0; })

/* File ranges must fit in off_t. */
static int bad_file_range(uint64_t offset, uint64_t length)
{
    return offset > INT64_MAX || length > (uint64_t)INT64_MAX - offset;
}

/* Address ranges must not wrap. */
static int bad_addr_range(uint64_t addr, uint64_t length)
{
    return addr > UINTPTR_MAX || length > (uint64_t)UINTPTR_MAX - addr;
}

int vmem_punch_hole(int fd, uint64_t offset, uint64_t length)
{
    if (bad_file_range(offset, length))
        return -EINVAL;
    if (length == 0)
        return 0;
    return RETRY(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           (off_t)offset, (off_t)length));
}

int vmem_punch_ranges(int fd, const uint64_t *pairs, size_t npairs, size_t *done)
{
    size_t i, first;
    int rc;

    *done = 0;
    /* Check everything first so a bad pair punches nothing. */
    for (i = 0; i < npairs; i++)
        if (bad_file_range(pairs[2 * i], pairs[2 * i + 1]))
            return -EINVAL;
    for (first = 0; first < npairs; first = i) {
        uint64_t start = pairs[2 * first];
        uint64_t end = start + pairs[2 * first + 1];
        /* Extend while the next pair starts where this run ends (~2 us per
         * syscall makes 4 KiB calls 5x slower than one big one). */
        for (i = first + 1; i < npairs && pairs[2 * i] == end; i++)
            end += pairs[2 * i + 1];
        rc = vmem_punch_hole(fd, start, end - start);
        if (rc < 0)
            return rc;
        *done = i;
    }
    return 0;
}

int vmem_madv_remove(uint64_t addr, uint64_t length)
{
    if (bad_addr_range(addr, length))
        return -EINVAL;
    if (length == 0)
        return 0;
    return RETRY(madvise((void *)(uintptr_t)addr, (size_t)length, MADV_REMOVE));
}

int vmem_populate_write(uint64_t addr, uint64_t length)
{
    if (bad_addr_range(addr, length))
        return -EINVAL;
    if (length == 0)
        return 0;
    return RETRY(madvise((void *)(uintptr_t)addr, (size_t)length, MADV_POPULATE_WRITE));
}

int vmem_fallocate(int fd, uint64_t offset, uint64_t length)
{
    if (bad_file_range(offset, length))
        return -EINVAL;
    if (length == 0)
        return 0;
    return RETRY(fallocate(fd, 0, (off_t)offset, (off_t)length));
}

int vmem_same_file(int a, int b)
{
    pid_t pid = getpid();
    long r = syscall(SYS_kcmp, pid, pid, KCMP_FILE, (unsigned long)a, (unsigned long)b);

    if (r < 0)
        return -errno;
    return r == 0;
}

int64_t vmem_allocated_bytes(int fd)
{
    struct stat st;

    if (fstat(fd, &st) < 0)
        return -errno;
    return (int64_t)st.st_blocks * 512;
}

int vmem_data_extents(int fd, uint64_t start, uint64_t end,
                      uint64_t *out_pairs, size_t max_pairs, size_t *n_out)
{
    size_t n = 0;
    off_t pos = (off_t)start, data, hole;

    *n_out = 0;
    if (start > end || end > INT64_MAX)
        return -EINVAL;
    while (pos < (off_t)end) {
        data = lseek(fd, pos, SEEK_DATA);
        if (data < 0) {
            if (errno == ENXIO) /* no data at or after pos */
                break;
            return -errno;
        }
        if (data >= (off_t)end)
            break;
        hole = lseek(fd, data, SEEK_HOLE);
        if (hole < 0) {
            if (errno != ENXIO) /* ENXIO: truncated under us */
                return -errno;
            break;
        }
        if (hole > (off_t)end)
            hole = (off_t)end;
        if (n == max_pairs) {
            *n_out = n;
            return -E2BIG;
        }
        out_pairs[2 * n] = (uint64_t)data;
        out_pairs[2 * n + 1] = (uint64_t)(hole - data);
        n++;
        pos = hole;
    }
    *n_out = n;
    return 0;
}

int vmem_mincore_resident(uint64_t addr, uint64_t length, uint64_t *resident_pages)
{
    unsigned char vec[4096]; /* one byte per page: 16 MiB per mincore call */
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE), count = 0, chunk, npages, i;

    *resident_pages = 0;
    if (bad_addr_range(addr, length) || addr % page)
        return -EINVAL;
    while (length > 0) {
        chunk = length < sizeof(vec) * page ? length : sizeof(vec) * page;
        if (mincore((void *)(uintptr_t)addr, (size_t)chunk, vec) < 0)
            return -errno;
        npages = (chunk + page - 1) / page;
        for (i = 0; i < npages; i++)
            count += vec[i] & 1;
        addr += chunk;
        length -= chunk;
    }
    *resident_pages = count;
    return 0;
}


/* Little-endian hosts only (the split ring is little-endian; x86-64 and
 * aarch64 Linux are). The release store orders every earlier store of this
 * thread, including the response bytes Python wrote into the guest's
 * buffers, before the index. */
uint16_t vmem_load_acquire_u16(uint64_t addr)
{
    return __atomic_load_n((const uint16_t *)(uintptr_t)addr, __ATOMIC_ACQUIRE);
}

void vmem_publish_used(uint64_t elem_addr, uint32_t id, uint32_t len, uint64_t idx_addr, uint16_t idx)
{
    uint32_t *elem = (uint32_t *)(uintptr_t)elem_addr;
    __atomic_store_n(&elem[0], id, __ATOMIC_RELAXED);
    __atomic_store_n(&elem[1], len, __ATOMIC_RELAXED);
    __atomic_store_n((uint16_t *)(uintptr_t)idx_addr, idx, __ATOMIC_RELEASE);
}


/* --- vhost-user messages (see vmemshim.h) --------------------------------- */

#define JOURNAL_STEP 8    /* offsets in the journal (vmemdev/daemon/inflight.py) */
#define JOURNAL_FIELDS 12 /* request, length, reply length, crc32 */
#define JOURNAL_REPLY 28

static uint32_t crc_tables[8][256];

/* The CRC-32 of zlib (and Python's zlib.crc32), eight bytes per step
 * ("slicing by 8": a GET_CONFIG reply is 80 bytes and a vCPU waits for it).
 * The tables are built once, when the library is loaded. */
__attribute__((constructor)) static void build_crc_tables(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_tables[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int k = 1; k < 8; k++)
            crc_tables[k][n] = (crc_tables[k - 1][n] >> 8) ^ crc_tables[0][crc_tables[k - 1][n] & 0xFF];
}

static uint32_t crc32(const uint8_t *p, size_t n)
{
    const uint32_t (*t)[256] = crc_tables;
    uint32_t c = 0xFFFFFFFFu, one, two;

    for (; n >= 8; p += 8, n -= 8) {
        memcpy(&one, p, 4);
        memcpy(&two, p + 4, 4);
        one ^= c;
        c = t[7][one & 0xFF] ^ t[6][(one >> 8) & 0xFF] ^ t[5][(one >> 16) & 0xFF] ^ t[4][one >> 24] ^
            t[3][two & 0xFF] ^ t[2][(two >> 8) & 0xFF] ^ t[1][(two >> 16) & 0xFF] ^ t[0][two >> 24];
    }
    while (n--)
        c = t[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

int vmem_msg_peek(int sock, uint8_t *buf, uint32_t len, int *fds, uint32_t max_fds, uint32_t *nfds)
{
    union { struct cmsghdr align; char bytes[CMSG_SPACE(253 * sizeof(int))]; } control; /* SCM_MAX_FD */
    struct iovec iov = { buf, len };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.bytes,
                          .msg_controllen = CMSG_SPACE((max_fds < 253 ? max_fds : 253) * sizeof(int)) };
    ssize_t n;
    uint32_t count = 0;

    *nfds = 0;
    do
        n = recvmsg(sock, &msg, MSG_PEEK | MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t in_cmsg = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < in_cmsg; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
            if (count < max_fds)
                fds[count++] = fd;
            else
                close(fd); /* cannot happen: the buffer holds max_fds */
        }
    }
    if (msg.msg_flags & MSG_CTRUNC) { /* more than max_fds came: none is usable */
        while (count)
            close(fds[--count]);
        count = max_fds + 1;
    }
    *nfds = count;
    return (int)n;
}

int vmem_msg_finish(int sock, uint8_t *journal, uint32_t request, uint32_t length, const char *reply,
                    uint32_t reply_len, int steps, uint32_t *consumed)
{
    uint8_t scratch[4096];
    ssize_t n;

    if ((steps & VMEM_MSG_KEEP) && journal) {
        uint32_t fields[4] = { request, length, reply_len, crc32((const uint8_t *)reply, reply_len) };
        memcpy(journal + JOURNAL_REPLY, reply, reply_len);
        memcpy(journal + JOURNAL_FIELDS, fields, sizeof(fields));
        /* Last: until here a successor sees the step before. */
        __atomic_store_n((uint32_t *)(journal + JOURNAL_STEP), VMEM_STEP_OWED, __ATOMIC_RELEASE);
    }
    if (steps & VMEM_MSG_CONSUME) {
        *consumed = 0;
        while (*consumed < length) {
            uint32_t want = length - *consumed;
            n = recv(sock, scratch, want < sizeof(scratch) ? want : sizeof(scratch), MSG_DONTWAIT);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0)
                return -errno;
            if (n == 0)
                return -EPIPE;
            *consumed += (uint32_t)n;
        }
    }
    if (!(steps & VMEM_MSG_SEND))
        return 0;
    if (journal)
        __atomic_store_n((uint32_t *)(journal + JOURNAL_STEP), reply_len ? VMEM_STEP_SENDING : VMEM_STEP_IDLE,
                         __ATOMIC_RELEASE);
    if (!reply_len)
        return 0;
    do
        n = send(sock, reply, reply_len, MSG_DONTWAIT | MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno == EAGAIN ? 0 : -errno;
    return (int)n;
}
