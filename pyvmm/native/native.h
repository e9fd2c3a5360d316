/* Declarations shared by pyvmm's C parts; also fed to cffi's cdef (keep it plain C, no macros). */
int pyvmm_native_version(void);
