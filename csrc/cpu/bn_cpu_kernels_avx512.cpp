// The CPU kernels compiled for AVX-512 F/BW/VL/DQ (16 floats a vector); bn_cpu.cpp calls
// them on processors that have those. See bn_cpu_isa.h.
#define FUSEDRES_ISA isa_avx512
#define FUSEDRES_ISA_AVX512 1
#include "cpu/bn_cpu_isa.h"
