"""Code that runs inside rollout workers: candidate sampling, the decode loop, tensor-parallel ranks."""
