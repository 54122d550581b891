// df5t-deploy CUDA kernels: the on-device DDRM loop's operators, noise, tiling and I/O maps.
//
// Every kernel has a numpy twin with the same semantics (named in its comment); tests
// compare them. All kernels are 1-D grid-stride loops without shared memory, barriers or
// atomics (each output element has one writer, so results are deterministic), so the same
// source also compiles with g++ through tests/cuda_emulation.h (one "thread" walks the whole
// range) and its logic is tested on machines without a GPU.
//
// Layouts: states are [B, 3, H, W] float32, B = group planes x samples (b = g * samples + s);
// measurements ybar and singular values are [G, H, W] (s may be shared: stride 0).
// Per-step scalars come from a device table indexed by a device cursor (steps[*cursor]), and
// the noise step is the cursor itself, so one captured step (a CUDA graph) replays for every
// step: df5t_advance moves the cursor at the end of a step.

#ifndef DF5T_EMULATION
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned short f16bits;
#define DF5T_GLOBAL extern "C" __global__
#define DF5T_DEVICE __device__ __forceinline__
#define DF5T_FIRST_INDEX ((u64)blockIdx.x * blockDim.x + threadIdx.x)
#define DF5T_STRIDE ((u64)blockDim.x * gridDim.x)
DF5T_DEVICE float df5t_half_to_float(f16bits h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
DF5T_DEVICE f16bits df5t_float_to_half(float f) { f16bits h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
#endif

#define DF5T_FOR_EACH(i, n) for (u64 i = DF5T_FIRST_INDEX; i < (u64)(n); i += DF5T_STRIDE)

// ------------------------------------------------------------------ noise (twin: noise.gaussian_field)

DF5T_DEVICE void df5t_philox4x32_10(u32 c[4], u32 k0, u32 k1) {
    for (int round = 0; round < 10; ++round) {
        if (round) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const u64 p0 = (u64)0xD2511F53u * c[0];
        const u64 p1 = (u64)0xCD9E8D57u * c[2];
        const u32 n0 = (u32)(p1 >> 32) ^ c[1] ^ k0;
        const u32 n2 = (u32)(p0 >> 32) ^ c[3] ^ k1;
        c[0] = n0;
        c[1] = (u32)p1;
        c[2] = n2;
        c[3] = (u32)p0;
    }
}

// Three normals for one pixel: counter (x, y, plane, step | draw << 16 | orientation << 24).
DF5T_DEVICE void df5t_normals3(u64 seed, u32 step_word, u32 plane, u32 y, u32 x, float z[3]) {
    u32 c[4] = {x, y, plane, step_word};
    df5t_philox4x32_10(c, (u32)seed, (u32)(seed >> 32));
    const double inv = 2.3283064365386963e-10;  // 2^-32
    const double two_pi = 6.283185307179586;
    const double r01 = sqrt(-2.0 * log(((double)c[0] + 0.5) * inv));
    const double r23 = sqrt(-2.0 * log(((double)c[2] + 0.5) * inv));
    z[0] = (float)(r01 * cos(two_pi * ((double)c[1] * inv)));
    z[1] = (float)(r01 * sin(two_pi * ((double)c[1] * inv)));
    z[2] = (float)(r23 * cos(two_pi * ((double)c[3] * inv)));
}

// ------------------------------------------------------------------ DDRM algebra (twin: sampler.py)

struct DF5TStep {
    float sqrt_ab, sqrt_1m_ab;  // x0 = (x - sqrt(1 - abar) eps) / sqrt(abar)
    float sn, sigma0, eta, eta_b;
    float sqrt_ab_next;         // x_next = sqrt(abar_next) V(v)
};

// Channel basis (sampler.CHANNEL_BASIS): grey (1,1,1)/sqrt3, then (1,-1,0)/sqrt2, (1,1,-2)/sqrt6.
#define DF5T_R3 0.57735026918962576f
#define DF5T_R2 0.70710678118654752f
#define DF5T_R6 0.40824829046386302f

DF5T_DEVICE void df5t_to_basis(const float p[3], float a[3]) {
    a[0] = DF5T_R3 * (p[0] + p[1] + p[2]);
    a[1] = DF5T_R2 * (p[0] - p[1]);
    a[2] = DF5T_R6 * (p[0] + p[1] - 2.0f * p[2]);
}

DF5T_DEVICE void df5t_from_basis(const float a[3], float p[3]) {
    p[0] = DF5T_R3 * a[0] + DF5T_R2 * a[1] + DF5T_R6 * a[2];
    p[1] = DF5T_R3 * a[0] - DF5T_R2 * a[1] + DF5T_R6 * a[2];
    p[2] = DF5T_R3 * a[0] - 2.0f * DF5T_R6 * a[2];
}

// sampler.ddrm_update for one coordinate; s == 0 is unobserved, s * sn == sigma0 the noisy case.
DF5T_DEVICE float df5t_update(float v0, float ve, float ybar, float s, float z, const DF5TStep& p) {
    const float c_dir = sqrtf(fmaxf(p.sn * p.sn - (p.eta * p.sn) * (p.eta * p.sn), 0.0f));
    if (s > 0.0f && s * p.sn > p.sigma0) {
        const float var = p.sn * p.sn - p.sigma0 * p.sigma0 * p.eta_b * p.eta_b / (s * s);
        return p.eta_b * ybar / s + (1.0f - p.eta_b) * v0 + sqrtf(fmaxf(var, 0.0f)) * z;
    }
    const float direction = s > 0.0f ? (ybar - s * v0) / p.sigma0 : ve;
    return v0 + c_dir * direction + p.eta * p.sn * z;
}

// Loads pixel i of state b: x0 and eps in the channel basis, and the pixel's noise in it too.
DF5T_DEVICE void df5t_load(const float* x, const float* eps, u64 b, u64 i, u64 n, const DF5TStep& p,
                           float a0[3], float ae[3]) {
    float x0[3], e[3];
    for (int c = 0; c < 3; ++c) {
        e[c] = eps[(b * 3 + c) * n + i];
        x0[c] = (x[(b * 3 + c) * n + i] - p.sqrt_1m_ab * e[c]) / p.sqrt_ab;
    }
    df5t_to_basis(x0, a0);
    df5t_to_basis(e, ae);
}

// Where a walk's noise comes from, read from a device table u32[3 + 3 * groups] (region row and
// column, orientation << 24, then for each plane of the group its id and its seed's low and high
// words: frames walked together keep their own seeds) so that a step captured once replays for
// every walk of the same shape. Twin: device_loop.walk_table.
struct DF5TWalk {
    u32 y0, x0, word_base;
    const u32* planes;  // [groups][3]: plane id, seed low, seed high
};
DF5T_DEVICE DF5TWalk df5t_walk(const u32* w) {
    DF5TWalk walk = {w[0], w[1], w[2], w + 3};
    return walk;
}

// x0, eps and the pixel's noise, all in the channel basis, for pixel i of state b at the
// noise step `step`.
DF5T_DEVICE void df5t_pixel(const float* x, const float* eps, u64 b, u64 i, u64 n, u32 samples, u32 width,
                            const DF5TWalk& w, u32 step, const DF5TStep& p, float a0[3], float ae[3], float az[3]) {
    float z[3];
    df5t_load(x, eps, b, i, n, p, a0, ae);
    const u32* plane = w.planes + 3 * (b / samples);
    df5t_normals3((u64)plane[1] | (u64)plane[2] << 32, w.word_base | step | (u32)(b % samples) << 16, plane[0],
                  w.y0 + (u32)(i / width), w.x0 + (u32)(i % width), z);
    df5t_to_basis(z, az);
}

// The walk's step cursor: the step index of the table entry in use.
DF5T_GLOBAL void df5t_advance(u32* cursor) {
    DF5T_FOR_EACH(i, 1) cursor[0] += 1;
}

// t [n] = the network timestep of the current step, for every tile of the batch.
DF5T_GLOBAL void df5t_fill_timesteps(float* t, const float* t_table, const u32* cursor, u32 n) {
    DF5T_FOR_EACH(i, n) t[i] = t_table[cursor[0]];
}

// One DDRM step for operators whose V is the identity or a permutation (denoise, inpaint):
// the spectral layout is the pixel grid, s and ybar are per pixel. Twin: DDRM.step with
// operators.Identity / operators.Inpainting.
DF5T_GLOBAL void df5t_ddrm_step_pointwise(
    const float* x, const float* eps, const float* ybar, const float* s, u64 s_stride, float* x_next,
    u32 batch, u32 samples, u32 height, u32 width, const u32* walk, const DF5TStep* steps, const u32* cursor) {
    const u64 n = (u64)height * width;
    const DF5TStep p = steps[cursor[0]];
    const DF5TWalk w = df5t_walk(walk);
    DF5T_FOR_EACH(k, (u64)batch * n) {
        const u64 b = k / n, i = k % n, g = b / samples;
        float a0[3], ae[3], az[3], v[3], out[3];
        df5t_pixel(x, eps, b, i, n, samples, width, w, cursor[0], p, a0, ae, az);
        v[0] = df5t_update(a0[0], ae[0], ybar[g * n + i], s[g * s_stride + i], az[0], p);
        v[1] = df5t_update(a0[1], ae[1], 0.0f, 0.0f, az[1], p);
        v[2] = df5t_update(a0[2], ae[2], 0.0f, 0.0f, az[2], p);
        df5t_from_basis(v, out);
        for (int c = 0; c < 3; ++c) x_next[(b * 3 + c) * n + i] = p.sqrt_ab_next * out[c];
    }
}

// One DDRM step for the block mean (sr: R x R; along z: k x 1), one thread per block. V is
// the block's orthonormal 2D DCT, of which only the first (constant, 1/sqrt(by bx)) coefficient
// is observed, with singular value 1/sqrt(by bx)/sqrt(3); ybar is on the measurement grid
// [G, H/by, W/bx]. The update of the unobserved coefficients is the same linear map in every
// coordinate, so it is applied to the pixels directly and only the first coefficient is
// corrected: no DCT, no per-block arrays (a thread needs no stack), two passes over the block.
// Twin: DDRM.step with operators.BlockMean.
DF5T_GLOBAL void df5t_ddrm_step_block(
    const float* x, const float* eps, const float* ybar, float* x_next,
    u32 batch, u32 samples, u32 height, u32 width, u32 by, u32 bx, const u32* walk, const DF5TStep* steps,
    const u32* cursor) {
    const u64 n = (u64)height * width;
    const DF5TStep p = steps[cursor[0]];
    const DF5TWalk w = df5t_walk(walk);
    const u32 bw = width / bx, blocks = (height / by) * bw;
    const float root = sqrtf((float)(by * bx));
    const float s_first = 0.57735026918962576f / root;
    DF5T_FOR_EACH(k, (u64)batch * blocks) {
        const u64 b = k / blocks, blk = k % blocks, g = b / samples;
        const u32 top = (u32)(blk / bw) * by, left = (u32)(blk % bw) * bx;
        float sum0 = 0.0f, sum_e = 0.0f, sum_z = 0.0f;  // grey coordinate sums: first DCT coefficients * root
        for (u32 r = 0; r < by; ++r)
            for (u32 c = 0; c < bx; ++c) {
                float a0[3], ae[3], az[3];
                df5t_pixel(x, eps, b, (u64)(top + r) * width + left + c, n, samples, width, w, cursor[0], p, a0, ae, az);
                sum0 += a0[0];
                sum_e += ae[0];
                sum_z += az[0];
            }
        const float observed = df5t_update(sum0 / root, sum_e / root, ybar[(u64)g * blocks + blk], s_first, sum_z / root, p);
        const float as_unobserved = df5t_update(sum0 / root, sum_e / root, 0.0f, 0.0f, sum_z / root, p);
        const float correction = (observed - as_unobserved) / root;  // back through the constant basis vector
        for (u32 r = 0; r < by; ++r)
            for (u32 c = 0; c < bx; ++c) {
                const u64 i = (u64)(top + r) * width + left + c;
                float a0[3], ae[3], az[3], v[3], out[3];
                df5t_pixel(x, eps, b, i, n, samples, width, w, cursor[0], p, a0, ae, az);
                for (int ch = 0; ch < 3; ++ch) v[ch] = df5t_update(a0[ch], ae[ch], 0.0f, 0.0f, az[ch], p);
                v[0] += correction;
                df5t_from_basis(v, out);
                for (int ch = 0; ch < 3; ++ch) x_next[(b * 3 + ch) * n + i] = p.sqrt_ab_next * out[ch];
            }
    }
}

// For operators with a global V (the blur's DCT, applied by the backend's FFT library between
// these kernels): split a state into grey coordinates of x0, eps and the noise (to be
// transformed), and the already updated colour differences. Twin: the first half of DDRM.step.
DF5T_GLOBAL void df5t_ddrm_split(
    const float* x, const float* eps, float* g0, float* ge, float* gz, float* diffs,
    u32 batch, u32 samples, u32 height, u32 width, const u32* walk, const DF5TStep* steps, const u32* cursor) {
    const u64 n = (u64)height * width;
    const DF5TStep p = steps[cursor[0]];
    const DF5TWalk w = df5t_walk(walk);
    DF5T_FOR_EACH(k, (u64)batch * n) {
        const u64 b = k / n, i = k % n;
        float a0[3], ae[3], az[3];
        df5t_pixel(x, eps, b, i, n, samples, width, w, cursor[0], p, a0, ae, az);
        g0[k] = a0[0];
        ge[k] = ae[0];
        gz[k] = az[0];
        diffs[(b * 2) * n + i] = df5t_update(a0[1], ae[1], 0.0f, 0.0f, az[1], p);
        diffs[(b * 2 + 1) * n + i] = df5t_update(a0[2], ae[2], 0.0f, 0.0f, az[2], p);
    }
}

// The spectral update of the grey coordinates (twin: sampler.ddrm_update), in place in v0.
DF5T_GLOBAL void df5t_ddrm_update(float* v0, const float* ve, const float* vz, const float* ybar,
                                  const float* s, u32 batch, u32 samples, u64 n, const DF5TStep* steps,
                                  const u32* cursor) {
    const DF5TStep p = steps[cursor[0]];
    DF5T_FOR_EACH(k, (u64)batch * n) {
        const u64 g = (k / n) / samples, i = k % n;
        v0[k] = df5t_update(v0[k], ve[k], ybar[g * n + i], s[i], vz[k], p);
    }
}

// x_next from the (inverse-transformed) grey coordinate and the colour differences.
DF5T_GLOBAL void df5t_ddrm_merge(const float* grey, const float* diffs, float* x_next, u32 batch, u64 n,
                                 const DF5TStep* steps, const u32* cursor) {
    const DF5TStep p = steps[cursor[0]];
    DF5T_FOR_EACH(k, (u64)batch * n) {
        const u64 b = k / n, i = k % n;
        const float a[3] = {grey[k], diffs[(b * 2) * n + i], diffs[(b * 2 + 1) * n + i]};
        float out[3];
        df5t_from_basis(a, out);
        for (int c = 0; c < 3; ++c) x_next[(b * 3 + c) * n + i] = p.sqrt_ab_next * out[c];
    }
}

// ------------------------------------------------------------------ tiling (twin: tiling.py)

// numpy.pad(mode="reflect") index: mirror without repeating the edge sample.
DF5T_DEVICE long long df5t_reflect(long long i, long long n) {
    if (n == 1) return 0;
    const long long period = 2 * (n - 1);
    i = i < 0 ? -i : i;
    i %= period;
    return i >= n ? period - i : i;
}

// tiles [J, 3, T, T] from regions [P, 3, H, W], tile j at (plane tp[j], row ty[j], column tx[j])
// of the reflect-padded region (padding pad_top, pad_left). Twin: tiling.gather_tiles.
#define DF5T_GATHER(NAME, OUT_T, CONVERT)                                                             \
    DF5T_GLOBAL void NAME(const float* region, OUT_T* tiles, const int* tp, const int* ty, const int* tx, \
                          u32 n_tiles, u32 height, u32 width, int pad_top, int pad_left, u32 tile) {  \
        const u64 per = (u64)3 * tile * tile;                                                         \
        DF5T_FOR_EACH(k, (u64)n_tiles * per) {                                                        \
            const u64 j = k / per, r = k % per, c = r / ((u64)tile * tile), q = r % ((u64)tile * tile); \
            const long long y = df5t_reflect((long long)ty[j] + (long long)(q / tile) - pad_top, height); \
            const long long x = df5t_reflect((long long)tx[j] + (long long)(q % tile) - pad_left, width); \
            tiles[k] = CONVERT(region[(((u64)tp[j] * 3 + c) * height + y) * width + x]);              \
        }                                                                                             \
    }
#define DF5T_IDENTITY(v) (v)
DF5T_GATHER(df5t_gather_tiles_f32, float, DF5T_IDENTITY)
DF5T_GATHER(df5t_gather_tiles_f16, f16bits, df5t_float_to_half)

// eps [P, 3, H, W]: at every pixel, the window-weighted mean of the tiles covering it (padded
// coordinates), cropped from the padded region. One thread per output element sums its tiles
// in job order (rows of tiles, then columns), so there are no atomics and reruns are bit for
// bit identical. Tile rows row_first[y] .. + row_count[y] cover padded row y (likewise
// columns); tile (p, iy, ix) is job (p * rows + iy) * cols + ix, at (ys[iy], xs[ix]), with
// windows row_windows[iy] and col_windows[ix]. Twin: tiling.finalize_blend(tiling.blend_tiles).
#define DF5T_BLEND(NAME, IN_T, CONVERT)                                                                    \
    DF5T_GLOBAL void NAME(const IN_T* tiles, const int* ys, const int* xs, const float* row_windows,        \
                          const float* col_windows, const int* row_first, const int* row_count,            \
                          const int* col_first, const int* col_count, u32 rows, u32 cols, float* eps,      \
                          u32 planes, u32 height, u32 width, int pad_top, int pad_left, u32 tile) {        \
        const u64 n = (u64)height * width;                                                                 \
        DF5T_FOR_EACH(k, (u64)planes * 3 * n) {                                                            \
            const u64 pc = k / n, i = k % n, p = pc / 3, c = pc % 3;                                       \
            const u64 y = i / width + pad_top, x = i % width + pad_left;                                   \
            float sum = 0.0f, weight = 0.0f;                                                               \
            for (int iy = row_first[y]; iy < row_first[y] + row_count[y]; ++iy) {                          \
                for (int ix = col_first[x]; ix < col_first[x] + col_count[x]; ++ix) {                      \
                    const u64 j = (p * rows + iy) * cols + ix, ty = y - ys[iy], tx = x - xs[ix];            \
                    const float w = row_windows[(u64)iy * tile + ty] * col_windows[(u64)ix * tile + tx];    \
                    sum += CONVERT(tiles[((j * 3 + c) * tile + ty) * tile + tx]) * w;                       \
                    weight += w;                                                                           \
                }                                                                                          \
            }                                                                                              \
            eps[k] = sum / weight;                                                                         \
        }                                                                                                  \
    }
DF5T_BLEND(df5t_blend_tiles_f32, float, DF5T_IDENTITY)
DF5T_BLEND(df5t_blend_tiles_f16, f16bits, df5t_half_to_float)

// ------------------------------------------------------------------ results (twin: sampler.state_to_image)

// Final states [B, 3, H, W] -> grey images [B, H, W] on [0, 1]: the mean over channels of
// clamp((x+1)/2, 0, 1). The host maps them to input units (IntensityMap.from_unit).
DF5T_GLOBAL void df5t_state_to_grey(const float* x, float* out, u32 batch, u64 n) {
    DF5T_FOR_EACH(k, (u64)batch * n) {
        const u64 b = k / n, i = k % n;
        float unit = 0.0f;
        for (int c = 0; c < 3; ++c) unit += fminf(fmaxf((x[(b * 3 + c) * n + i] + 1.0f) * 0.5f, 0.0f), 1.0f);
        out[k] = unit / 3.0f;
    }
}
