/*
 * posix_shm.c - POSIX shared-memory segments (see posix_shm.h).
 */
#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/posix_shm.h"

int epx_shm_create(const char *name, size_t bytes, int reserve, void **base, const char **failed) {
  *base = NULL;
  *failed = "shm_open";
  int fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0 && errno == EEXIST) {
    /* Only a crashed communicator with the same random id could have left it. */
    shm_unlink(name);
    fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
  }
  if (fd < 0) return errno;
  int err = 0;
  if (ftruncate(fd, (off_t)bytes) != 0) {
    err = errno;
    *failed = "ftruncate";
    goto fail;
  }
  if (reserve) {
    /* Only a full filesystem is an error; EINVAL or EOPNOTSUPP mean it cannot
     * reserve, and the segment works without. */
    int r = posix_fallocate(fd, 0, (off_t)bytes);
    if (r == ENOSPC || r == ENOMEM) {
      err = r;
      *failed = "posix_fallocate";
      goto fail;
    }
  }
  void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    err = errno;
    *failed = "mmap";
    goto fail;
  }
  close(fd);
  *base = p;
  *failed = "";
  return 0;
fail:
  close(fd);
  shm_unlink(name);
  return err ? err : EIO;
}

int epx_shm_open(const char *name, size_t bytes, void **base, const char **failed,
                 long long *actual) {
  *base = NULL;
  *actual = -1;
  *failed = "shm_open";
  int fd = shm_open(name, O_RDWR | O_CLOEXEC, 0);
  if (fd < 0) return errno;
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int err = errno;
    *failed = "fstat";
    close(fd);
    return err;
  }
  if ((size_t)st.st_size != bytes) {
    *actual = (long long)st.st_size;
    *failed = "size";
    close(fd);
    return EINVAL;
  }
  void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int err = errno;
  close(fd);
  if (p == MAP_FAILED) {
    *failed = "mmap";
    return err ? err : EIO;
  }
  *base = p;
  *failed = "";
  return 0;
}
