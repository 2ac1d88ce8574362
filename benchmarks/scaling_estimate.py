"""Data-parallel and FSDP efficiency at 8, 64 and 256 GPUs, estimated from a single-GPU step.

The model (documented in docs/benchmarks.md):

  step(N) = t_compute + exposed_comm(N)
  efficiency(N) = t_compute / step(N)            (weak scaling: fixed per-GPU batch)

Communication per step, per GPU, with ring algorithms (NCCL's bandwidth-optimal choice for
large messages), for a collective over N GPUs of a buffer of B bytes:

  all-reduce      2 (N-1)/N * B / busbw  + latency
  all-gather      (N-1)/N * B / busbw    + latency
  reduce-scatter  (N-1)/N * B / busbw    + latency
  latency         2 * log2(N) * alpha    (tree/ring start-up; alpha per hop)

`busbw` is the NVLink bandwidth while all N GPUs sit in one node (N <= gpus_per_node) and the
per-GPU network bandwidth (one NIC per GPU, rail-optimised fabric) beyond. Data-parallel
all-reduces the trainable gradients once per step; FSDP all-gathers the sharded parameters
for the forward and again for the backward and reduce-scatters their gradients. Collectives
issued during the backward overlap with it: only the part longer than `overlap` x backward
time is exposed (XLA's async collectives on GPU; `overlap=0` gives the no-overlap bound).
"""

from __future__ import annotations

import dataclasses
import math

# H100 SXM: NVLink 4 is 900 GB/s bidirectional per GPU (450 GB/s each way); NCCL's measured
# all-reduce bus bandwidth within an 8-GPU HGX node is ~360-400 GB/s. Across nodes: one
# 400 Gb/s NDR InfiniBand NIC per GPU = 50 GB/s, ~40-45 GB/s bus bandwidth in practice.
H100_NVLINK_BUSBW = 370e9
H100_IB_BUSBW = 42e9
H100_BF16_PEAK = 989e12


@dataclasses.dataclass(frozen=True)
class Workload:
  """What one GPU does per step, and what must be communicated."""
  name: str
  step_compute_s: float        # measured (or modelled) single-GPU step time
  step_source: str             # where step_compute_s comes from
  trainable_params: int        # gradients all-reduced under DP
  sharded_params: int          # parameters FSDP shards (all-gathered fwd + bwd)
  grad_bytes: int = 4          # fp32 gradients
  param_gather_bytes: int = 2  # bf16 copies gathered for compute
  backward_fraction: float = 2 / 3  # share of the step spent in the backward pass


def ring_time(kind: str, nbytes: float, n: int, busbw: float, alpha: float = 10e-6) -> float:
  if n <= 1:
    return 0.0
  factor = {"all_reduce": 2.0, "all_gather": 1.0, "reduce_scatter": 1.0}[kind]
  return factor * (n - 1) / n * nbytes / busbw + 2 * math.log2(n) * alpha


def estimate(w: Workload, gpus: int, strategy: str, *, gpus_per_node: int = 8,
             nvlink_busbw: float = H100_NVLINK_BUSBW, net_busbw: float = H100_IB_BUSBW,
             overlap: float = 0.8) -> dict:
  """One row: communication time, exposed part and efficiency for `strategy` at `gpus`."""
  busbw = nvlink_busbw if gpus <= gpus_per_node else net_busbw
  t_c = w.step_compute_s
  t_bwd = w.backward_fraction * t_c
  if strategy == "dp":
    comm = ring_time("all_reduce", w.trainable_params * w.grad_bytes, gpus, busbw)
    overlappable = comm
    fwd_comm = 0.0
  elif strategy == "fsdp":
    gather = ring_time("all_gather", w.sharded_params * w.param_gather_bytes, gpus, busbw)
    scatter = ring_time("reduce_scatter", w.trainable_params * w.grad_bytes, gpus, busbw)
    # DP all-reduce of the gradients of parameters that stay replicated.
    comm = 2 * gather + scatter
    # The forward all-gather overlaps the forward (prefetch of the next layer), the backward
    # gather and the reduce-scatter the backward.
    fwd_comm = gather
    overlappable = gather + scatter
  else:
    raise ValueError(f"unknown strategy {strategy!r}: 'dp' or 'fsdp'")
  t_fwd = t_c - t_bwd
  exposed = max(0.0, overlappable - overlap * t_bwd) + max(0.0, fwd_comm - overlap * t_fwd)
  return {
      "workload": w.name, "strategy": strategy, "gpus": gpus,
      "step_compute_ms": 1e3 * t_c, "comm_ms": 1e3 * comm, "exposed_comm_ms": 1e3 * exposed,
      "efficiency": t_c / (t_c + exposed), "busbw_gb_s": busbw / 1e9,
      "step_source": w.step_source,
  }


def table(workloads, gpu_counts=(8, 64, 256), strategies=("dp", "fsdp"), **kw) -> list[dict]:
  return [estimate(w, n, s, **kw) for w in workloads for s in strategies for n in gpu_counts]


def modelled_step_s(flops_per_step: float, mfu: float = 0.4, peak: float = H100_BF16_PEAK) -> float:
  """Step time of `flops_per_step` at `mfu` of `peak`: used only when no GPU measurement exists."""
  return flops_per_step / (mfu * peak)


# Analytic FLOPs (2 per multiply-add; matmuls only, which is >97% of these models).

def vit_forward_flops(layers: int = 24, width: int = 1024, mlp: int = 4096, tokens: int = 257) -> float:
  per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width
  return layers * per_layer


def qformer_forward_flops(tokens: int, *, layers: int = 12, width: int = 768, mlp: int = 3072,
                          queries: int = 32, cross_every: int = 2, enc_tokens: int = 257,
                          enc_width: int = 1024) -> float:
  self_part = 2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width
  cross = (2 * queries * 2 * width * width + 2 * enc_tokens * 2 * enc_width * width
           + 4 * queries * enc_tokens * width)
  return layers * self_part + (layers // cross_every) * cross


def qure_step_flops(batch: int, *, text_tokens: int = 32, cached_features: bool = False,
                    vit_layers: int = 24, qformer_layers: int = 12) -> float:
  """A QuRe step: the frozen ViT encodes reference, target and negative (forward only, unless
  cached); the Q-Former composes (queries + text) and encodes target and negative (queries
  only), forward + backward (x3)."""
  vit = 0.0 if cached_features else 3 * vit_forward_flops(layers=vit_layers)
  q = (qformer_forward_flops(32 + text_tokens, layers=qformer_layers)
       + 2 * qformer_forward_flops(32, layers=qformer_layers))
  return batch * (vit + 3 * q)


def decoder_forward_flops(tokens: int, *, layers: int = 32, width: int = 3072, mlp: int = 8192,
                          kv_width: int = 3072) -> float:
  per_layer = (2 * tokens * (2 * width * width + 2 * width * kv_width + 3 * width * mlp)
               + 4 * tokens * tokens * width)
  return layers * per_layer


def instructcir_lora_step_flops(batch: int, *, prompt_tokens: int = 320, caption_tokens: int = 64,
                                lora_fraction: float = 0.0) -> float:
  """An InstructCIR stage-2 step: CLIP-L on the reference image (frozen, forward), Phi-3.5-mini
  on the (image + instruction) prompt, the target caption and the hard-negative caption.
  With LoRA the backward still runs through the base weights for activations (2x forward)
  but computes no base weight gradients, so the decoder costs ~2x forward, not 3x."""
  vit = vit_forward_flops()
  dec = decoder_forward_flops(prompt_tokens) + 2 * decoder_forward_flops(caption_tokens)
  return batch * (vit + (2.0 + lora_fraction) * dec)
