/*
 * posix_shm.h - creating and mapping POSIX shared-memory segments, for every
 * user of /dev/shm in the library (the host backend's rank segments, the CUDA
 * backend's liveness words). Callers turn the errno into their own message.
 */
#ifndef EPX_CORE_POSIX_SHM_H
#define EPX_CORE_POSIX_SHM_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Creates a fresh segment `name` of `bytes` (one left by a crashed process
 * under the same name is replaced), reserves its pages when `reserve` (so a
 * full /dev/shm fails here instead of raising SIGBUS at first touch; a
 * filesystem that cannot reserve is not an error) and maps it read-write.
 * Returns 0, or the errno of the call that failed, named in *failed
 * ("shm_open", "ftruncate", "posix_fallocate" or "mmap"); on failure nothing
 * is left behind. */
int epx_shm_create(const char *name, size_t bytes, int reserve, void **base, const char **failed);

/* Maps an existing segment that must have exactly `bytes`. Returns 0, or an
 * errno with *failed naming the call ("shm_open", "fstat" or "mmap"); a
 * segment of another size gives EINVAL with *failed = "size" and its size in
 * *actual. */
int epx_shm_open(const char *name, size_t bytes, void **base, const char **failed,
                 long long *actual);

#ifdef __cplusplus
}
#endif

#endif /* EPX_CORE_POSIX_SHM_H */
