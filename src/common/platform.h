/*
 * platform.h - what lets one function serve host and device code.
 */
#ifndef EPX_COMMON_PLATFORM_H
#define EPX_COMMON_PLATFORM_H

#if defined(__CUDACC__)
#define EPX_HD static __host__ __device__ __forceinline__
#else
#define EPX_HD static inline
#endif

#endif /* EPX_COMMON_PLATFORM_H */
