"""GeoForge fused kernels: one module per fused op (Triton kernel, autograd wrapper, reference, CPU path)."""
