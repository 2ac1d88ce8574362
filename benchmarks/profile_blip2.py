"""Where BLIP-2 encoding's time goes on CPU: `encode_image` at the bench's sizes (EVA-g width
1408/16 heads, 2 ViT layers, Q-Former 768 x 2 layers, batch 4, 224 px; benchmarks/
bench_blip2_encode.py), JAX and PyTorch side by side, split into the ViT, the Q-Former and
the ViT's dense layers (GEMMs) timed alone at their shapes, against this machine's measured
fp32 matmul rate.

    python benchmarks/profile_blip2.py --out benchmarks/results/profile_blip2_cpu.json

Stages (median of `--iters` runs after one warm-up call):
  encode_image        the whole: ViT -> ln_vision -> Q-Former -> projection -> normalise
  vit                 the ViT alone (`blip2.vision_features` / HF's `vision_model`)
  qformer             the rest, from the ViT's features
  vit_dense_gemms     the ViT's dense layers alone (qkv, output, fc1, fc2 of every layer),
                      as plain matmuls at their shapes: what no implementation can beat
                      without a faster GEMM
  matmul_rate         GFLOP/s of one [batch*257, 1408] x [1408, 6144] matmul (fc1's shape)
  vit_attention       one ViT layer's attention core (QK^T, softmax, AV; 16 heads of 88 over
                      257 tokens): jax as the model runs it (`jax.nn.dot_product_attention`,
                      implementation 'xla') and as einsums; torch as HF's eager path
  vit_gelu, vit_layernorm  one layer's exact-erf GELU over [batch*257, 6144] and one
                      LayerNorm over [batch*257, 1408]
The JSON records the 1-minute load average at start and end, cores and threads; a profile
taken on a loaded machine measures the load (docs/benchmarks.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import profiling  # pylint: disable=g-import-not-at-top,wrong-import-position



def profile(iters: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import bench_blip2_encode as bench  # pylint: disable=g-import-not-at-top
  from cirjax import benchmarking  # pylint: disable=g-import-not-at-top
  from cirjax.models import blip2  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_default_matmul_precision", "highest")
  sz = bench._sizes("cpu", False)  # pylint: disable=protected-access
  m = bench._hf_model(sz, "cpu")  # pylint: disable=protected-access
  cfg, params = benchmarking.blip2_from_torch(m)
  params = jax.device_put(params)
  b = sz["batch"]
  pixels = np.random.default_rng(0).standard_normal((b, 224, 224, 3)).astype(np.float32)
  px_j = jax.device_put(pixels)
  px_t = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
  t_enc, _ = bench._torch_fns(m)  # pylint: disable=protected-access

  enc = jax.jit(lambda p, x: blip2.encode_image(p, cfg, x))
  vit = jax.jit(lambda p, x: blip2.vision_features(p, cfg, x))
  feats = vit(params, px_j)
  rest = jax.jit(lambda p, f: blip2.encode_target_from_features(p, cfg, f))
  t: dict[str, float] = {}
  t["jax_encode_image"] = profiling.median(lambda: enc(params, px_j).block_until_ready(), iters)
  t["jax_vit"] = profiling.median(lambda: vit(params, px_j).block_until_ready(), iters)
  t["jax_qformer"] = profiling.median(lambda: rest(params, feats).block_until_ready(), iters)
  t["torch_encode_image"] = profiling.median(lambda: t_enc(px_t), iters)
  with torch.no_grad():
    img_t = m.vision_model(px_t).last_hidden_state
    t["torch_vit"] = profiling.median(lambda: m.vision_model(px_t), iters)

    def torch_rest():
      q = m.query_tokens.expand(b, -1, -1)
      h = m.qformer(query_embeds=q, encoder_hidden_states=img_t).last_hidden_state
      return torch.nn.functional.normalize(m.vision_projection(h), dim=-1)

    t["torch_qformer"] = profiling.median(torch_rest, iters)

  # The ViT's dense layers at their shapes: [tokens, in] x [in, out], once per layer.
  tokens, width, mlp = b * 257, 1408, 6144
  shapes = [(width, 3 * width), (width, width), (width, mlp), (mlp, width)]
  rng = np.random.default_rng(1)
  mats = [(rng.standard_normal((tokens, i)).astype(np.float32),
           rng.standard_normal((i, o)).astype(np.float32)) for i, o in shapes]
  jmats = [jax.device_put(x) for x in mats]
  mm = jax.jit(lambda a, w: a @ w)
  layers = sz["vision_layers"]
  t["jax_vit_dense_gemms"] = layers * sum(
      profiling.median(lambda a=a, w=w: mm(a, w).block_until_ready(), iters) for a, w in jmats)
  tmats = [(torch.from_numpy(a), torch.from_numpy(w)) for a, w in mats]
  with torch.no_grad():
    t["torch_vit_dense_gemms"] = layers * sum(
        profiling.median(lambda a=a, w=w: a @ w, iters) for a, w in tmats)
  gemm_flops = layers * sum(2.0 * tokens * i * o for i, o in shapes)
  a, w = jmats[2]
  rate = 2.0 * tokens * width * mlp / profiling.median(lambda: mm(a, w).block_until_ready(), iters)
  ta, tw = tmats[2]
  with torch.no_grad():
    trate = 2.0 * tokens * width * mlp / profiling.median(lambda: ta @ tw, iters)
  heads, head_dim = 16, width // 16
  qkv = [rng.standard_normal((b, 257, heads, head_dim)).astype(np.float32) for _ in range(3)]
  jq, jk, jv = (jax.device_put(x) for x in qkv)
  xla_att = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))

  def einsum_att(q, k, v):
    p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)

  ein_att = jax.jit(einsum_att)
  t["jax_vit_attention_xla"] = profiling.median(lambda: xla_att(jq, jk, jv).block_until_ready(), iters)
  t["jax_vit_attention_einsum"] = profiling.median(lambda: ein_att(jq, jk, jv).block_until_ready(),
                                          iters)
  tq, tk, tv = (torch.from_numpy(x).permute(0, 2, 1, 3).contiguous() for x in qkv)
  with torch.no_grad():
    t["torch_vit_attention"] = profiling.median(
        lambda: ((tq @ tk.transpose(-1, -2)) / np.sqrt(head_dim)).softmax(-1) @ tv, iters)
  act = rng.standard_normal((tokens, mlp)).astype(np.float32)
  hid = rng.standard_normal((tokens, width)).astype(np.float32)
  gelu = jax.jit(lambda x: jax.nn.gelu(x, approximate=False))
  ja, jh = jax.device_put(act), jax.device_put(hid)
  t["jax_vit_gelu"] = profiling.median(lambda: gelu(ja).block_until_ready(), iters)
  ta, th = torch.from_numpy(act), torch.from_numpy(hid)
  t["torch_vit_gelu"] = profiling.median(lambda: torch.nn.functional.gelu(ta), iters)
  ln = jax.jit(lambda x: (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(
      x.var(-1, keepdims=True) + 1e-6))
  t["jax_vit_layernorm"] = profiling.median(lambda: ln(jh).block_until_ready(), iters)
  t["torch_vit_layernorm"] = profiling.median(
      lambda: torch.nn.functional.layer_norm(th, (width,), eps=1e-6), iters)
  flops = enc.lower(params, px_j).compile().cost_analysis()
  flops = (flops[0] if isinstance(flops, list) else flops).get("flops")
  return {"sizes": {**sz, "tokens_per_image": 257, "width": width, "mlp": mlp},
          "seconds": t, "encode_image_flops": flops, "vit_dense_gemm_flops": gemm_flops,
          "jax_matmul_rate_gflops": rate / 1e9, "torch_matmul_rate_gflops": trate / 1e9,
          "jax_encode_image_gflops": flops / t["jax_encode_image"] / 1e9 if flops else None,
          "speedup_vs_torch": t["torch_encode_image"] / t["jax_encode_image"],
          "dense_share_of_jax": t["jax_vit_dense_gemms"] / t["jax_encode_image"],
          "dense_share_of_torch": t["torch_vit_dense_gemms"] / t["torch_encode_image"]}


def main(argv=None) -> int:
  return profiling.cli(argv, __doc__, profile, "--iters", 5, "timed runs per stage")


if __name__ == "__main__":
  sys.exit(main())
