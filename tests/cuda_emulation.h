// Grid emulation: compile df5t_deploy/cuda/kernels.cu with g++ and call its kernels as plain
// C functions. Every kernel is a grid-stride loop, so one "thread" with index 0 and stride 1
// walks the whole range.
#pragma once
#include <cmath>
#include <cstring>

#define DF5T_EMULATION 1
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned short f16bits;
#define DF5T_GLOBAL extern "C"
#define DF5T_DEVICE static inline
#define DF5T_FIRST_INDEX ((u64)0)
#define DF5T_STRIDE ((u64)1)

static inline float df5t_half_to_float(f16bits h) {
    _Float16 v;
    std::memcpy(&v, &h, sizeof v);
    return (float)v;
}

static inline f16bits df5t_float_to_half(float f) {
    _Float16 v = (_Float16)f;
    f16bits h;
    std::memcpy(&h, &v, sizeof h);
    return h;
}
