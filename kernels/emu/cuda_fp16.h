// Stands in for CUDA's header when kernels/*.cu are compiled for the CPU emulation.
#pragma once
#include "emu.h"
