"""Tools that work on the kernels rather than run them: ``python -m kernels.tools.build`` builds every Triton kernel
for an H100 without a GPU and reports its registers, spills and shared memory."""
