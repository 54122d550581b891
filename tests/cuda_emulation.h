// Grid emulation: compile df5t_deploy/cuda/kernels.cu with g++ and call its kernels as plain
// C functions. Every kernel is a grid-stride loop; a launch (tests/kernel_emulation.py) calls
// the kernel once per emulated thread of a multi-block grid, in a shuffled order, after
// df5t_emu_set_thread has set that thread's first index and the grid's stride. So a kernel
// that depended on launch order, on one block or on one thread per block would fail here.
#pragma once
#include <cmath>
#include <cstring>

#define DF5T_EMULATION 1
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned short f16bits;
#define DF5T_GLOBAL extern "C"
#define DF5T_DEVICE static inline

static u64 df5t_emu_first = 0, df5t_emu_stride = 1;
extern "C" void df5t_emu_set_thread(u64 first, u64 stride) {
    df5t_emu_first = first;
    df5t_emu_stride = stride;
}
#ifndef DF5T_EMU_SKEW  // tests plant an off-by-one with -DDF5T_EMU_SKEW=1
#define DF5T_EMU_SKEW 0
#endif
#define DF5T_FIRST_INDEX (df5t_emu_first + DF5T_EMU_SKEW)
#define DF5T_STRIDE df5t_emu_stride

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
