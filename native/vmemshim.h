/* vmemshim: the few Linux memory syscalls vmemdev needs, for cffi.
 *
 * Every function returns 0 (or a non-negative value) on success and -errno
 * on failure; none prints. Offsets and lengths are checked so that
 * offset + length neither overflows nor exceeds off_t (-EINVAL); a zero
 * length is a successful no-op. */
#ifndef VMEMSHIM_H
#define VMEMSHIM_H

#include <stddef.h>
#include <stdint.h>

/* fallocate(PUNCH_HOLE|KEEP_SIZE): frees the file's pages, keeps its size. */
int vmem_punch_hole(int fd, uint64_t offset, uint64_t length);
/* pairs = npairs (offset, length) pairs; adjacent pairs are merged and each
 * merged range is punched with one syscall. *done = number of input pairs
 * fully punched before a failure (npairs on success). */
int vmem_punch_ranges(int fd, const uint64_t *pairs, size_t npairs, size_t *done);
/* madvise(MADV_REMOVE): frees a shared mapping's backing pages. */
int vmem_madv_remove(uint64_t addr, uint64_t length);
/* madvise(MADV_POPULATE_WRITE): allocates and maps pages writable. */
int vmem_populate_write(uint64_t addr, uint64_t length);
/* fallocate(mode 0): allocates the file's pages (shmem zeroes on first touch). */
int vmem_fallocate(int fd, uint64_t offset, uint64_t length);
/* st_blocks * 512, or -errno. */
int64_t vmem_allocated_bytes(int fd);
/* Allocated extents in [start, end) as (offset, length) pairs, clipped to the
 * window. -E2BIG (with *n_out = max_pairs) when more extents exist. Moves the
 * fd's file position. */
int vmem_data_extents(int fd, uint64_t start, uint64_t end,
                      uint64_t *out_pairs, size_t max_pairs, size_t *n_out);
/* Number of resident pages in [addr, addr + length); addr page-aligned. */
int vmem_mincore_resident(uint64_t addr, uint64_t length, uint64_t *resident_pages);

#endif
