/* Glue for pyvmm's C parts. */
#include "native.h"

int pyvmm_native_version(void) { return 1; }
