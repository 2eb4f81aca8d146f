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
/* 1 if fds a and b of this process share one open file description
 * (kcmp(2) KCMP_FILE), 0 if not; -errno (-ENOSYS without CONFIG_KCMP). */
int vmem_same_file(int a, int b);
/* Number of resident pages in [addr, addr + length); addr page-aligned. */
int vmem_mincore_resident(uint64_t addr, uint64_t length, uint64_t *resident_pages);

/* Split-virtqueue index accesses shared with a guest (virtio 1.x, 2.7.13).
 * addr must be 2-byte aligned and mapped. One 16-bit load with acquire
 * ordering: what the driver wrote before it published this index (ring
 * entries, descriptors) is visible to the loads that follow. */
uint16_t vmem_load_acquire_u16(uint64_t addr);
/* Store a used element { le32 id; le32 len } at elem_addr (4-byte aligned),
 * then the used index at idx_addr with one 16-bit release store: a driver
 * that sees the new index sees the whole element, and never a partial index. */
void vmem_publish_used(uint64_t elem_addr, uint32_t id, uint32_t len, uint64_t idx_addr, uint16_t idx);

/* vhost-user messages on a unix stream socket, the way a state file needs
 * them (vmemdev/daemon/vhost_wire.py, inflight.py): a message is peeked,
 * handled, and only then taken off the socket, after its reply has been
 * kept in the journal of the message in flight. In C because a vCPU waits
 * for every GET_CONFIG's reply: Python's recvmsg builds ancillary data and
 * objects per call, and the journal's stores are a few Python calls each.
 *
 * Peek up to len bytes into buf, left on the socket (MSG_PEEK|MSG_DONTWAIT|
 * MSG_CMSG_CLOEXEC). The fds that came with them (the kernel's copies, now
 * the caller's) go to fds, and *nfds says how many; more than max_fds
 * (MSG_CTRUNC): all are closed and *nfds is max_fds + 1. Returns the bytes
 * peeked (0: the peer closed), or -errno (-EAGAIN: nothing to read yet). */
int vmem_msg_peek(int sock, uint8_t *buf, uint32_t len, int *fds, uint32_t max_fds, uint32_t *nfds);

/* The steps of vmem_msg_finish, and the journal's steps it stores (the
 * journal's layout, little-endian: magic[8], then u32 step, request,
 * length, reply length, crc32 of the reply, then the reply). */
enum { VMEM_MSG_KEEP = 1, VMEM_MSG_CONSUME = 2, VMEM_MSG_SEND = 4, VMEM_MSG_ALL = 7 };
enum { VMEM_STEP_IDLE = 0, VMEM_STEP_OWED = 2, VMEM_STEP_SENDING = 3 };

/* The end of a handled message: the steps named in `steps`, in this order.
 * KEEP: the reply, its request, the message's length, the reply's length
 * and crc32 into the journal, then the step OWED (a release store, last).
 * CONSUME: take `length` bytes (the peeked message) off the socket; *consumed
 * counts them. SEND: the step SENDING (IDLE when reply_len is 0, a message
 * without a reply), then the reply, sent with MSG_DONTWAIT|MSG_NOSIGNAL.
 * journal NULL (no state file): the socket steps only. Returns the reply
 * bytes the socket took (fewer than reply_len: it is full, send the rest),
 * or -errno: of the consume when *consumed < length (-EAGAIN: wait, take
 * the rest, go on with SEND; -EPIPE: the peer closed), else of the send. */
int vmem_msg_finish(int sock, uint8_t *journal, uint32_t request, uint32_t length, const char *reply,
                    uint32_t reply_len, int steps, uint32_t *consumed);

#endif
