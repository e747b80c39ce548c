// Runs the HLWQ CUDA kernels (compiled for the CPU through shim/common.cuh) against ggml's CPU reference:
// the KV quantizer of SET_ROWS/CPY must give the CPU quantizer's bytes, the dequantizer and GET_ROWS its values,
// the rotation ggml_hlwq_fwht's, and the vector kernel (MUL_MAT, MUL_MAT_ID) the products of the dequantized
// weights within test-backend-ops' tolerance. One line per case, "FAIL" in it when it fails.
#include "hlwq-kv.cu"
#include "mmvq-hlwq.cu"

#include "ggml-hlwq.h"
#include "fattn-hlwq.cuh" // vec_dot_fattn_vec_KQ_hlwq and dequantize_V_hlwq, cut out of fattn-common.cuh

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>

#define GGML_CUDA_HLWQ_NC32_CASE(T) case T: return dequantize_hlwq_nc_cuda<T, float>;
to_fp32_nc_cuda_t ggml_get_to_fp32_nc_cuda(ggml_type type) {
    switch (type) {
        GGML_CUDA_HLWQ_TYPES(GGML_CUDA_HLWQ_NC32_CASE)
        default: return nullptr;
    }
}

static int failures = 0;

static void report(bool ok, const std::string & what) {
    printf("%s %s\n", ok ? "OK  " : "FAIL", what.c_str());
    failures += !ok;
}

static std::mt19937 rng(1234);

// rows of N(0, s^2) with a different s per row, an all-zero row and a row with outliers
static std::vector<float> test_rows(int64_t n_per_row, int64_t nrows) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> x(n_per_row*nrows);
    for (int64_t r = 0; r < nrows; ++r) {
        const float s = r == 1 ? 0.0f : std::pow(10.0f, (float) (r % 7) - 3.0f);
        for (int64_t i = 0; i < n_per_row; ++i) {
            x[r*n_per_row + i] = s*normal(rng);
        }
        if (r == 2) {
            x[r*n_per_row + 5] *= 40.0f;
        }
    }
    return x;
}

static double nmse(const std::vector<double> & ref, const std::vector<float> & out) {
    double err = 0.0, norm = 0.0;
    for (size_t i = 0; i < ref.size(); ++i) {
        err  += (out[i] - ref[i])*(out[i] - ref[i]);
        norm += ref[i]*ref[i];
    }
    return norm > 0.0 ? err/norm : err;
}

static ggml_context * new_context() {
    ggml_init_params params = { size_t(256) << 20, nullptr, false };
    return ggml_init(params);
}

// SET_ROWS into a permutation of the destination rows, over two channels of indices
static void test_set_rows(ggml_type type) {
    ggml_backend_cuda_context cuda;
    ggml_context * ctx = new_context();
    const int64_t qk = ggml_blck_size(type), n_per_row = 3*qk, nrows = 7, nrows_dst = 9;
    ggml_tensor * src = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n_per_row, nrows, 2);
    ggml_tensor * idx = ggml_new_tensor_2d(ctx, GGML_TYPE_I64, nrows, 2);
    ggml_tensor * dst = ggml_new_tensor_3d(ctx, type, n_per_row, nrows_dst, 2);
    const std::vector<float> x = test_rows(n_per_row, nrows*2);
    memcpy(src->data, x.data(), x.size()*sizeof(float));
    memset(dst->data, 0, ggml_nbytes(dst));
    std::vector<int64_t> perm(nrows_dst);
    for (int64_t c = 0; c < 2; ++c) {
        for (int64_t i = 0; i < nrows_dst; ++i) perm[i] = i;
        std::shuffle(perm.begin(), perm.end(), rng);
        for (int64_t r = 0; r < nrows; ++r) ((int64_t *) idx->data)[c*nrows + r] = perm[r];
    }
    ggml_cuda_set_rows_hlwq(cuda, src, idx, dst);

    const size_t row_size = ggml_row_size(type, n_per_row);
    std::vector<uint8_t> ref(row_size*nrows*2);
    ggml_quantize_chunk(type, x.data(), ref.data(), 0, nrows*2, n_per_row, nullptr);
    int64_t bad_blocks = 0;
    for (int64_t c = 0; c < 2; ++c) {
        for (int64_t r = 0; r < nrows; ++r) {
            const int64_t d = ((int64_t *) idx->data)[c*nrows + r];
            const uint8_t * got = (const uint8_t *) dst->data + c*dst->nb[2] + d*dst->nb[1];
            const uint8_t * want = ref.data() + (c*nrows + r)*row_size;
            for (int64_t b = 0; b < n_per_row/qk; ++b) {
                const size_t bs = ggml_type_size(type);
                bad_blocks += memcmp(got + b*bs, want + b*bs, bs) != 0;
            }
        }
    }
    report(bad_blocks == 0, std::string("SET_ROWS f32->") + ggml_type_name(type) + ": " + std::to_string(bad_blocks) +
        " of " + std::to_string(nrows*2*n_per_row/qk) + " blocks differ from the CPU quantizer's bytes");
    ggml_free(ctx);
}

// CPY from a permuted F32 tensor, then back to F32
static void test_cpy(ggml_type type) {
    ggml_backend_cuda_context cuda;
    ggml_context * ctx = new_context();
    const int64_t qk = ggml_blck_size(type), n = 2*qk, a = 3, b = 5;
    ggml_tensor * base = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n, a, b);
    const std::vector<float> x = test_rows(n, a*b);
    memcpy(base->data, x.data(), x.size()*sizeof(float));
    ggml_tensor * src = ggml_permute(ctx, base, 0, 2, 1, 3); // [n, b, a], rows not in memory order
    ggml_tensor * dst = ggml_new_tensor_3d(ctx, type, n, b, a);
    ggml_cuda_cpy_hlwq(cuda, src, dst);

    const size_t row_size = ggml_row_size(type, n);
    std::vector<float> rows(n*a*b);
    for (int64_t i2 = 0; i2 < a; ++i2) for (int64_t i1 = 0; i1 < b; ++i1) {
        memcpy(&rows[(i2*b + i1)*n], (const char *) src->data + i1*src->nb[1] + i2*src->nb[2], n*sizeof(float));
    }
    std::vector<uint8_t> ref(row_size*a*b);
    ggml_quantize_chunk(type, rows.data(), ref.data(), 0, a*b, n, nullptr);
    const bool same = memcmp(ref.data(), dst->data, ref.size()) == 0;
    report(same, std::string("CPY f32 (permuted) -> ") + ggml_type_name(type) + ": bytes " + (same ? "equal" : "differ from") + " the CPU quantizer's");

    ggml_tensor * back = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n, b, a);
    ggml_cuda_cpy_hlwq(cuda, dst, back);
    std::vector<float> want(n*a*b);
    ggml_get_type_traits(type)->to_float(ref.data(), want.data(), n*a*b);
    float max_rel = 0.0f;
    for (int64_t i = 0; i < n*a*b; ++i) {
        max_rel = fmaxf(max_rel, fabsf(((float *) back->data)[i] - want[i])/fmaxf(fabsf(want[i]), 1e-30f));
    }
    report(max_rel <= 1e-6f, std::string("CPY ") + ggml_type_name(type) + " -> f32: max relative difference " +
        std::to_string(max_rel) + " to the CPU dequantizer");
    ggml_free(ctx);
}

// GET_ROWS of a [n, rows, 2] matrix with its own indices per channel
static void test_get_rows(ggml_type type) {
    ggml_context * ctx = new_context();
    const int64_t qk = ggml_blck_size(type), n = 3*qk, nrows = 9, nidx = 4;
    std::vector<float> x = test_rows(n, nrows*2);
    ggml_tensor * src = ggml_new_tensor_3d(ctx, type, n, nrows, 2);
    ggml_quantize_chunk(type, x.data(), src->data, 0, nrows*2, n, nullptr);
    std::vector<int32_t> idx = {3, 0, 8, 3, 1, 7, 2, 2};
    std::vector<float> out(n*nidx*2);

    switch (type) {
#define GGML_CUDA_HLWQ_GR_CASE(T) case T: get_rows_cuda_hlwq<T, float>(src->data, idx.data(), out.data(), n, src->nb[1], src->nb[2], \
        src->nb[3], nidx, 2, 1, sizeof(int32_t), nidx*sizeof(int32_t), 2*nidx*sizeof(int32_t), n*sizeof(float), n*nidx*sizeof(float), \
        2*n*nidx*sizeof(float), nullptr); break;
        GGML_CUDA_HLWQ_TYPES(GGML_CUDA_HLWQ_GR_CASE)
        default: break;
    }
    std::vector<float> all(n*nrows*2);
    ggml_get_type_traits(type)->to_float(src->data, all.data(), n*nrows*2);
    float max_rel = 0.0f;
    for (int64_t c = 0; c < 2; ++c) for (int64_t i = 0; i < nidx; ++i) for (int64_t j = 0; j < n; ++j) {
        const float want = all[(c*nrows + idx[c*nidx + i])*n + j];
        max_rel = fmaxf(max_rel, fabsf(out[(c*nidx + i)*n + j] - want)/fmaxf(fabsf(want), 1e-30f));
    }
    report(max_rel <= 1e-6f, std::string("GET_ROWS ") + ggml_type_name(type) + ": max relative difference " +
        std::to_string(max_rel) + " to the CPU dequantizer");
    ggml_free(ctx);
}

// the rotation flash attention applies to Q and to its output: from a non-contiguous tensor and in place
static void test_rotate(int qk) {
    ggml_context * ctx = new_context();
    const int64_t n = 4*qk;
    ggml_tensor * base = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n, 3, 2);
    const std::vector<float> x = test_rows(n, 6);
    memcpy(base->data, x.data(), x.size()*sizeof(float));
    ggml_tensor * src = ggml_permute(ctx, base, 0, 2, 1, 3);
    std::vector<float> out(n*6);
    ggml_cuda_hlwq_rotate((const float *) src->data, out.data(), qk, src->ne, src->nb, nullptr);
    std::vector<float> want(n*6);
    for (int64_t i2 = 0; i2 < 3; ++i2) for (int64_t i1 = 0; i1 < 2; ++i1) {
        float * row = &want[(i2*2 + i1)*n];
        memcpy(row, (const char *) src->data + i1*src->nb[1] + i2*src->nb[2], n*sizeof(float));
        for (int64_t b = 0; b < n; b += qk) ggml_hlwq_fwht(row + b, qk);
    }
    bool same = memcmp(out.data(), want.data(), out.size()*sizeof(float)) == 0;
    std::vector<float> inplace = x;
    ggml_tensor * contiguous = base;
    ggml_cuda_hlwq_rotate(inplace.data(), inplace.data(), qk, contiguous->ne, contiguous->nb, nullptr);
    for (int64_t r = 0; r < 6 && same; ++r) {
        std::vector<float> row(x.begin() + r*n, x.begin() + (r + 1)*n);
        for (int64_t b = 0; b < n; b += qk) ggml_hlwq_fwht(row.data() + b, qk);
        same = memcmp(row.data(), inplace.data() + r*n, n*sizeof(float)) == 0;
    }
    report(same, "rotate qk=" + std::to_string(qk) + ": strided and in place, bit-identical to ggml_hlwq_fwht");
    ggml_free(ctx);
}

// MUL_MAT through the vector kernel: weights [k, m, 1, 1], activations [k, n, 2, 2] (channels and samples broadcast)
static void test_mul_mat(ggml_type type, int64_t n) {
    ggml_backend_cuda_context cuda;
    ggml_context * ctx = new_context();
    const int64_t qk = ggml_blck_size(type), k = 8*qk + 3*qk, m = 3;
    const int64_t ne02 = 1, ne03 = 1, ne12 = 2, ne13 = 2;
    ggml_tensor * w = ggml_new_tensor_4d(ctx, type, k, m, ne02, ne03);
    ggml_tensor * x = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, k, n, ne12, ne13);
    ggml_tensor * dst = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, m, n, ne12, ne13);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> wf(k*m*ne02*ne03);
    for (float & v : wf) v = normal(rng);
    ggml_quantize_chunk(type, wf.data(), w->data, 0, m*ne02*ne03, k, nullptr);
    ggml_get_type_traits(type)->to_float(w->data, wf.data(), wf.size());
    for (int64_t i = 0; i < ggml_nelements(x); ++i) ((float *) x->data)[i] = normal(rng);
    ggml_cuda_mul_mat_vec_hlwq(cuda, w, x, nullptr, dst);

    std::vector<double> ref;
    std::vector<float> out;
    for (int64_t i3 = 0; i3 < ne13; ++i3) for (int64_t i2 = 0; i2 < ne12; ++i2) for (int64_t j = 0; j < n; ++j) for (int64_t r = 0; r < m; ++r) {
        const float * wr = &wf[((i3/(ne13/ne03)*ne02 + i2/(ne12/ne02))*m + r)*k];
        const float * xr = (const float *) x->data + ((i3*ne12 + i2)*n + j)*k;
        double s = 0.0;
        for (int64_t i = 0; i < k; ++i) s += (double) wr[i]*xr[i];
        ref.push_back(s);
        out.push_back(((float *) dst->data)[((i3*ne12 + i2)*n + j)*m + r]);
    }
    const double e = nmse(ref, out);
    report(e < 5e-4, std::string("MUL_MAT ") + ggml_type_name(type) + " n=" + std::to_string(n) + " k=" + std::to_string(k) +
        " broadcast: NMSE " + std::to_string(e) + " (test-backend-ops allows 5e-4)");
    ggml_free(ctx);
}

// MUL_MAT_ID: 6 experts, 3 used per token, activations per slot or broadcast
static void test_mul_mat_id(ggml_type type, int64_t n_tokens, bool broadcast) {
    ggml_backend_cuda_context cuda;
    ggml_context * ctx = new_context();
    const int64_t qk = ggml_blck_size(type), k = 5*qk, m = 3, n_experts = 6, n_used = 3;
    ggml_tensor * w = ggml_new_tensor_3d(ctx, type, k, m, n_experts);
    ggml_tensor * x = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, k, broadcast ? 1 : n_used, n_tokens);
    ggml_tensor * ids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_used, n_tokens);
    ggml_tensor * dst = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, m, n_used, n_tokens);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> wf(k*m*n_experts);
    for (float & v : wf) v = normal(rng);
    ggml_quantize_chunk(type, wf.data(), w->data, 0, m*n_experts, k, nullptr);
    ggml_get_type_traits(type)->to_float(w->data, wf.data(), wf.size());
    for (int64_t i = 0; i < ggml_nelements(x); ++i) ((float *) x->data)[i] = normal(rng);
    std::vector<int32_t> experts = {0, 1, 2, 3, 4, 5};
    for (int64_t t = 0; t < n_tokens; ++t) {
        std::shuffle(experts.begin(), experts.end(), rng);
        for (int64_t s = 0; s < n_used; ++s) ((int32_t *) ids->data)[t*n_used + s] = experts[s];
    }
    ggml_cuda_mul_mat_vec_hlwq(cuda, w, x, ids, dst);

    std::vector<double> ref;
    std::vector<float> out;
    for (int64_t t = 0; t < n_tokens; ++t) for (int64_t s = 0; s < n_used; ++s) for (int64_t r = 0; r < m; ++r) {
        const int32_t e = ((int32_t *) ids->data)[t*n_used + s];
        const float * wr = &wf[(e*m + r)*k];
        const float * xr = (const float *) x->data + (t*x->ne[1] + (broadcast ? 0 : s))*k;
        double sum = 0.0;
        for (int64_t i = 0; i < k; ++i) sum += (double) wr[i]*xr[i];
        ref.push_back(sum);
        out.push_back(((float *) dst->data)[(t*n_used + s)*m + r]);
    }
    const double e = nmse(ref, out);
    report(e < 5e-4, std::string("MUL_MAT_ID ") + ggml_type_name(type) + " tokens=" + std::to_string(n_tokens) +
        (broadcast ? " broadcast" : "") + ": NMSE " + std::to_string(e));
    ggml_free(ctx);
}

// Flash attention's HLWQ functions as fattn-vec.cuh calls them: a group of nthreads lanes dots one K row with Q,
// each lane holding the ints k_KQ_0 + lane of the q8_1 image of the rotated Q and the (d, sum) of their 32-blocks;
// V values come out in the rotated domain, d * c[code] / sqrt(qk)
template <ggml_type type, int D>
static void test_fattn(const std::vector<float> & q_rotated, const std::vector<uint8_t> & k_row) {
    constexpr int nthreads = D/4 < WARP_SIZE ? D/4 : WARP_SIZE;
    constexpr int qk = QK_HLWQ_64;
    std::vector<int32_t> q_i32(D/4);
    std::vector<float2>  q_ds(D/32);
    for (int g = 0; g < D/32; ++g) {
        float amax = 0.0f;
        for (int j = 0; j < 32; ++j) amax = fmaxf(amax, fabsf(q_rotated[g*32 + j]));
        const float d = amax/127.0f;
        int sum = 0;
        for (int j = 0; j < 32; ++j) {
            const int8_t v = (int8_t) roundf(d > 0.0f ? q_rotated[g*32 + j]/d : 0.0f);
            ((int8_t *) q_i32.data())[g*32 + j] = v;
            sum += v;
        }
        q_ds[g] = make_float2(d, d*sum);
    }
    std::vector<float> partial(nthreads);
    auto kernel = [&]() {
        int    q8[D/(4*nthreads)];
        float2 ds[D/(4*nthreads)];
        for (int k0 = 0; k0 < D/4; k0 += nthreads) {
            q8[k0/nthreads] = q_i32[k0 + threadIdx.x % nthreads];
            ds[k0/nthreads] = q_ds[(k0 + threadIdx.x % nthreads)/8];
        }
        partial[threadIdx.x] = vec_dot_fattn_vec_KQ_hlwq<type, D, nthreads>((const char *) k_row.data(), nullptr, q8, ds);
    };
    emu_launch(dim3(1), dim3(nthreads), 0, nullptr, kernel);
    double got = 0.0;
    for (float p : partial) got += p;

    // the reference: rotated K values times the q8_1 values of Q
    const float * cb = ggml_hlwq_get_codebook(GGML_HLWQ_TABLE_CANONICAL, type == GGML_TYPE_HLWQ3_64 ? 3 : 4).values;
    const int bits = type == GGML_TYPE_HLWQ3_64 ? 3 : 4;
    const size_t bs = ggml_type_size(type);
    std::vector<float> k_rotated(D);
    double want = 0.0;
    for (int b = 0; b < D/qk; ++b) {
        const uint8_t * block = k_row.data() + b*bs;
        _Float16 dh;
        memcpy(&dh, block, sizeof(dh));
        uint8_t codes[QK_HLWQ_64];
        ggml_hlwq_unpack_codes(block + 2, block + 2 + ggml_hlwq_qs_size(bits, qk), codes, bits, qk);
        const float d = (float) dh/sqrtf((float) qk);
        for (int j = 0; j < qk; ++j) {
            k_rotated[b*qk + j] = d*cb[codes[j]];
            want += (double) k_rotated[b*qk + j]*q_ds[(b*qk + j)/32].x*((const int8_t *) q_i32.data())[b*qk + j];
        }
    }
    const double rel = fabs(got - want)/fmax(fabs(want), 1e-30);
    report(rel < 1e-5, std::string("FA vec_dot_KQ ") + ggml_type_name(type) + " D=" + std::to_string(D) +
        " (" + std::to_string(nthreads) + " lanes): relative error " + std::to_string(rel));

    float max_rel = 0.0f;
    for (int i0 = 0; i0 < D; i0 += 4) {
        float v[4];
        dequantize_V_hlwq<type, float, 4>(k_row.data(), v, i0);
        for (int l = 0; l < 4; ++l) {
            max_rel = fmaxf(max_rel, fabsf(v[l] - k_rotated[i0 + l])/fmaxf(fabsf(k_rotated[i0 + l]), 1e-30f));
        }
    }
    report(max_rel <= 1e-6f, std::string("FA dequantize_V ") + ggml_type_name(type) + " D=" + std::to_string(D) +
        ": max relative difference " + std::to_string(max_rel) + " to the rotated-domain values");
}

template <ggml_type type, int D>
static void test_fattn_case() {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> k(D), q(D);
    for (float & v : k) v = normal(rng);
    for (float & v : q) v = normal(rng);
    std::vector<uint8_t> k_row(ggml_row_size(type, D));
    ggml_quantize_chunk(type, k.data(), k_row.data(), 0, 1, D, nullptr);
    for (int b = 0; b < D; b += QK_HLWQ_64) ggml_hlwq_fwht(q.data() + b, QK_HLWQ_64);
    test_fattn<type, D>(q, k_row);
}

int main() {
    static const ggml_type types[] = {
        GGML_TYPE_HLWQ3, GGML_TYPE_HLWQ4, GGML_TYPE_HLWQ5, GGML_TYPE_HLWQ6,
        GGML_TYPE_HLWQ3_64, GGML_TYPE_HLWQ4_64, GGML_TYPE_HLWQ5_64, GGML_TYPE_HLWQ6_64,
        GGML_TYPE_HLWQ3_A, GGML_TYPE_HLWQ4_A, GGML_TYPE_HLWQ5_A, GGML_TYPE_HLWQ6_A,
        GGML_TYPE_HLWQ3_B, GGML_TYPE_HLWQ4_B, GGML_TYPE_HLWQ5_B, GGML_TYPE_HLWQ6_B,
    };
    ggml_quantize_init(GGML_TYPE_HLWQ5);
    test_rotate(QK_HLWQ);
    test_rotate(QK_HLWQ_64);
    for (ggml_type type : types) {
        test_set_rows(type);
        test_cpy(type);
        test_get_rows(type);
    }
    for (ggml_type type : { GGML_TYPE_HLWQ5, GGML_TYPE_HLWQ3, GGML_TYPE_HLWQ4_64, GGML_TYPE_HLWQ6_64 }) {
        for (int64_t n = 1; n <= MMVQ_MAX_BATCH_SIZE; ++n) {
            test_mul_mat(type, n);
        }
        for (int64_t tokens : {1, 2, 5}) {
            test_mul_mat_id(type, tokens, false);
            test_mul_mat_id(type, tokens, true);
        }
    }
    test_fattn_case<GGML_TYPE_HLWQ3_64,  64>();
    test_fattn_case<GGML_TYPE_HLWQ3_64, 128>();
    test_fattn_case<GGML_TYPE_HLWQ4_64, 128>();
    test_fattn_case<GGML_TYPE_HLWQ4_64, 256>();
    printf("%d failures\n", failures);
    return failures != 0;
}
