#pragma once
#include "common.cuh"
// the converters hlwq-kv.cu asks for; the harness defines them over hlwq.cuh's dequantizer as convert.cu registers it
typedef void (*to_fp32_nc_cuda_t)(const void * x, float * y, int64_t ne00, int64_t ne01, int64_t ne02, int64_t ne03,
    int64_t s01, int64_t s02, int64_t s03, cudaStream_t stream);
to_fp32_nc_cuda_t ggml_get_to_fp32_nc_cuda(ggml_type type);
