// The CPU kernels compiled for AVX2 + FMA (8 floats a vector); bn_cpu.cpp calls them
// on processors that have both. See bn_cpu_isa.h.
#define FUSEDRES_ISA isa_avx2
#include "cpu/bn_cpu_isa.h"
