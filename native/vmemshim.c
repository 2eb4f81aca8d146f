/* See vmemshim.h. Kept minimal: policy and argument checks for callers live
 * in vmemdev/native.py; these checks only keep the syscalls well-defined. */
#define _GNU_SOURCE
#include "vmemshim.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/kcmp.h>
#include <sys/mman.h>
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
