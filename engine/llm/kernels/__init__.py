"""Small C kernels for the CPU decode path, built on first use with the system's C compiler
(about a second) and cached by source, compiler and CPU; see q8.py."""
