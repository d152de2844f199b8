# XLA flag presets for multi-device training, sourced by the launch scripts (one place, one line of why each).
# They tune how XLA schedules collectives; they do not change results. Override by exporting XLA_FLAGS /
# LIBTPU_INIT_ARGS yourself: the scripts append these to what is already set.
# shellcheck shell=bash disable=SC2034  # the arrays are read by the scripts that source this file

# TPU (read by libtpu from LIBTPU_INIT_ARGS).
TPU_XLA_FLAGS=(
  # Run all-gather / reduce-scatter / all-reduce asynchronously, fused with the compute around them.
  --xla_tpu_enable_async_collective_fusion=true
  # ... including the FSDP parameter all-gathers.
  --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true
  # ... and let one asynchronous collective span several compute steps (the next layer's gather).
  --xla_tpu_enable_async_collective_fusion_multiple_steps=true
  # Overlap collectives with the TensorCore's compute instead of serialising them.
  --xla_tpu_overlap_compute_collective_tc=true
  # Start all-gathers early (FSDP prefetch of the next layer's parameters).
  --xla_enable_async_all_gather=true
  # Combine the data-parallel gradient all-reduces into fewer, larger ones ...
  --xla_tpu_enable_data_parallel_all_reduce_opt=true
  # ... also across gradients of different sizes.
  --xla_tpu_data_parallel_opt_different_sized_ops=true
)

# GPU (read by XLA from XLA_FLAGS).
GPU_XLA_FLAGS=(
  # Schedule by estimated latency so collectives (FSDP gathers, expert all-to-alls) overlap compute.
  --xla_gpu_enable_latency_hiding_scheduler=true
  # Combine small collectives into ones of up to 128 MiB: fewer launches, better NCCL bandwidth.
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
  # Pipeline the collectives of a scanned layer group with the previous / next iteration's compute.
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  # Double-buffer the scan over layers so that iteration k+1's gathers run during iteration k.
  --xla_gpu_enable_while_loop_double_buffering=true
)
