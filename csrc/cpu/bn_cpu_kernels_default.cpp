// The CPU kernels compiled for the baseline instruction set of the build.
#define FUSEDRES_ISA isa_default
#include "cpu/bn_cpu_kernels.h"
