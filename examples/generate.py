"""Generate text with the KV cache of ``jflash.nnx.MultiHeadAttention``.

    python examples/generate.py                      # train briefly on CPU, then generate
    python examples/generate.py --prompt "The cat" --temperature 0.5 --steps 600

Trains the small GPT of ``train_gpt.py`` for a few hundred steps, then decodes:
the prompt is written to every layer's cache in one chunk (prefill), then each new
token is one jitted step (``decode=True``: 1 query against the cache, attended by
jflash with ``key_value_seq_lengths = cache_index``; no mask, no recompilation).
Before sampling it checks that cached decoding reproduces the full causal forward pass.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_gpt  # noqa: E402  (the model, data and training loop)


@nnx.jit
def forward_cached(model: train_gpt.GPT, tokens, start):
  """``tokens [B, t]`` at positions ``start..start+t-1``: writes them to every layer's
  cache and returns their logits ``[B, t, V]``. Compiles once per ``(B, t)``: a prompt
  prefill and single-token steps are the only two shapes used below."""
  return model(tokens, start=start, decode=True)


@jax.jit
def sample(logits, key, temperature):
  greedy = jnp.argmax(logits, axis=-1)
  sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def generate(model, prompt_ids: np.ndarray, num_new: int, *, temperature: float, seed: int):
  """Autoregressive sampling with the KV cache. ``prompt_ids [B, P]``; returns ``[B, P+num_new]``."""
  b, p = prompt_ids.shape
  if p + num_new > model.max_len:
    raise ValueError(f"prompt {p} + {num_new} new tokens exceed the model's max_len {model.max_len}")
  model.init_cache(b)
  logits = forward_cached(model, jnp.asarray(prompt_ids), 0)[:, -1]  # prefill
  key, temperature = jax.random.PRNGKey(seed), jnp.float32(temperature)
  out = []
  for i in range(num_new):
    key, sub = jax.random.split(key)
    tok = sample(logits, sub, temperature)
    out.append(tok)
    if i + 1 < num_new:
      logits = forward_cached(model, tok[:, None], p + i)[:, -1]
  return np.concatenate([prompt_ids, np.stack(jax.device_get(out), axis=1)], axis=1)


def check_cache(model, tokens: np.ndarray, prefill_len: int) -> float:
  """Max |logit| difference between cached decoding (a prefill chunk, then one token at a
  time) and the full causal forward pass over ``tokens [B, T]``."""
  full = nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens))
  model.init_cache(tokens.shape[0])
  outs = [forward_cached(model, jnp.asarray(tokens[:, :prefill_len]), 0)]
  outs += [forward_cached(model, jnp.asarray(tokens[:, i:i + 1]), i)
           for i in range(prefill_len, tokens.shape[1])]
  return float(jnp.abs(jnp.concatenate(outs, axis=1) - full).max())


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--prompt", default="The old man")
  p.add_argument("--new-tokens", type=int, default=100)
  p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy")
  p.add_argument("--samples", type=int, default=3)
  p.add_argument("--steps", type=int, default=250, help="training steps before generating")
  p.add_argument("--seq-len", type=int, default=96)
  p.add_argument("--d-model", type=int, default=64)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)

  args = train_gpt.parse_args([
      "--attention", "jflash", "--steps", str(a.steps), "--seq-len", str(a.seq_len),
      "--d-model", str(a.d_model), "--layers", str(a.layers), "--seed", str(a.seed)])
  text = train_gpt.make_corpus()
  tok = train_gpt.CharTokenizer.from_text(text)
  data = tok.encode(text)
  model = train_gpt.build(args, "jflash", tok)
  print(f"training {a.steps} steps (d_model {a.d_model}, layers {a.layers}, seq {a.seq_len})")
  train_gpt.train(model, data, args, log_every=max(1, a.steps // 3))

  prompt = np.asarray(tok.encode(a.prompt))[None].repeat(a.samples, 0)
  windows = np.stack([data[i * a.seq_len:(i + 1) * a.seq_len] for i in range(a.samples)])
  err = check_cache(model, windows, prompt.shape[1])  # same shapes as generation below
  print(f"KV-cache decoding vs full causal pass: max |logit diff| = {err:.2e}")
  if err > 1e-3:
    print("cache check FAILED", file=sys.stderr)
    return 1

  num_new = min(a.new_tokens, a.seq_len - prompt.shape[1])
  t0 = time.perf_counter()
  ids = generate(model, prompt, num_new, temperature=a.temperature, seed=a.seed)
  dt = time.perf_counter() - t0
  print(f"{a.samples} samples x {num_new} tokens in {dt:.2f}s ({a.samples * num_new / dt:,.0f} "
        f"tokens/s), temperature {a.temperature}:")
  for row in ids:
    print("  | " + tok.decode(row).replace("\n", "\n  | "))
  return 0


if __name__ == "__main__":
  sys.exit(main())
