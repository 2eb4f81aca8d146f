/* A guest driver's view of a used ring, from another process.
 *
 *   ring_poller FD USED_OFFSET NUM START_IDX STOP_IDX
 *
 * Maps the guest RAM file (FD, inherited) and spins on used.idx the way a
 * driver polling for completions may: each read is one aligned 16-bit
 * acquire load. The index only moves forward, from START_IDX to STOP_IDX
 * (fewer than 32768 requests), so every value read must lie between the
 * last one seen and STOP_IDX: anything else (a zero, a half-written index)
 * is torn. When the index moves, each newly published element must be
 * complete: id = 2 * (index % (NUM / 2)) (the test front-end's head for that
 * request) and len = 10 (a virtio-mem response). Stops at STOP_IDX or after
 * 120 s.
 * Prints one line: reads moves torn bad_elements first_torn_value. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: ring_poller FD USED_OFFSET NUM START_IDX STOP_IDX\n");
        return 2;
    }
    int fd = atoi(argv[1]);
    uint64_t used_off = strtoull(argv[2], NULL, 0);
    unsigned num = (unsigned)atoi(argv[3]);
    uint16_t last = (uint16_t)atoi(argv[4]);
    uint16_t stop = (uint16_t)atoi(argv[5]);
    struct stat st;
    if (fstat(fd, &st) < 0 || (uint64_t)st.st_size < used_off + 4 + 8 * num + 2) {
        perror("ring_poller: fstat");
        return 2;
    }
    uint8_t *base = mmap(NULL, st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        perror("ring_poller: mmap");
        return 2;
    }
    const uint16_t *idx = (const uint16_t *)(base + used_off + 2);
    const uint32_t *ring = (const uint32_t *)(base + used_off + 4);
    unsigned long long reads = 0, moves = 0, torn = 0, bad = 0;
    long first_torn = -1;
    time_t deadline = time(NULL) + 120;
    for (;;) {
        uint16_t now = __atomic_load_n(idx, __ATOMIC_ACQUIRE);
        reads++;
        uint16_t ahead = (uint16_t)(now - last);
        if (ahead > (uint16_t)(stop - last)) {
            torn++;
            if (first_torn < 0)
                first_torn = now;
        } else if (ahead) {
            for (uint16_t i = last; i != now; i++) {
                uint32_t id = ring[2 * (i % num)], len = ring[2 * (i % num) + 1];
                if (id != 2u * (i % (num / 2)) || len != 10)
                    bad++;
            }
            moves++;
            last = now;
            if (last == stop)
                break;
        }
        if ((reads & 0xFFFF) == 0 && time(NULL) > deadline)
            break;
    }
    printf("%llu %llu %llu %llu %ld %u\n", reads, moves, torn, bad, first_torn, (unsigned)last);
    return 0;
}
