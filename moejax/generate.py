"""Sample text from a trained run's latest checkpoint with KV-cache decoding (`moejax.decode`).

  python -m moejax.generate --workdir=DIR --prompt='def main(' [--prompt=...] [--max_new_tokens=64]
      [--temperature=0] [--top_p=1.0] [--seed=0]

Each prompt is encoded as a new document with the run's tokenizer (a separator token, then the
prompt's tokens, as in training), the prompts are decoded together as one batch, and each
continuation is printed after its prompt, detokenized with the same tokenizer. Temperature 0
is greedy. The context is the run's `data.seq_len`: a prompt plus its new tokens must fit.
A workdir without a config or a checkpoint, a prompt that does not fit, or a bad sampling
option is one line `moejax: error: ...` and a non-zero exit.
"""

from __future__ import annotations

import math

from absl import app, flags

from moejax import cli
from moejax.train.restore import load_config, load_model
from moejax.errors import ConfigError

FLAGS = flags.FLAGS


def check_options(prompts: list[str], max_new_tokens: int, temperature: float, top_p: float) -> None:
  """A ConfigError naming the one violated constraint: no prompt, a prompt that is not UTF-8, or a bad option."""
  if not prompts:
    raise ConfigError('give at least one --prompt')
  for i, text in enumerate(prompts):
    try:
      text.encode('utf-8')
    except UnicodeEncodeError as e:  # undecodable argv bytes arrive as lone surrogates
      raw = text.encode('utf-8', 'surrogateescape')[e.start:e.start + 1]
      raise ConfigError(f'--prompt number {i + 1} is not valid UTF-8 (byte 0x{raw.hex() if raw else "??"} at '
                        f'character {e.start}); prompts are text') from None
  if max_new_tokens < 1:
    raise ConfigError(f'--max_new_tokens={max_new_tokens} must be >= 1')
  if not (math.isfinite(temperature) and temperature >= 0):
    raise ConfigError(f'--temperature={temperature} must be a finite number >= 0 (0 is greedy)')
  if not (math.isfinite(top_p) and 0 < top_p <= 1):
    raise ConfigError(f'--top_p={top_p} must be in (0, 1]')


def generate_text(workdir: str, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0) -> list[str]:
  """The continuation of each prompt, as text, from the latest checkpoint in `workdir`."""
  check_options(prompts, max_new_tokens, temperature, top_p)
  cfg = load_config(workdir)
  from moejax.inference import decode  # pylint: disable=import-outside-toplevel  (jax loads only after the checks above)
  decode.check_decodable(cfg)
  cfg, corpus, model = load_model(workdir, cfg)
  encoded = [doc.astype(int).tolist() for doc in corpus.tokenizer.encode_documents([p.encode() for p in prompts])]
  context = cfg.data.seq_len
  for text, ids in zip(prompts, encoded):
    if len(ids) + max_new_tokens > context:
      raise ConfigError(f'prompt {text[:30]!r} is {len(ids)} tokens; with --max_new_tokens={max_new_tokens} it '
                        f'exceeds the run\'s context of {context} tokens (data.seq_len)')
  out = decode.Generator(model, len(prompts), context)(encoded, max_new_tokens, temperature, top_p, seed)
  sep = corpus.tokenizer.separator
  return [corpus.tokenizer.decode([t for t in ids if t != sep]).decode('utf-8', errors='replace') for ids in out]


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.workdir:
    raise app.UsageError('--workdir is required')
  texts = generate_text(FLAGS.workdir, FLAGS.prompt or [], FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_p,
                        FLAGS.seed)
  for prompt, text in zip(FLAGS.prompt, texts):
    print(f'--- {prompt!r}\n{prompt}{text}')


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'A trained run (config.json and checkpoints/).')
  flags.DEFINE_multi_string('prompt', None, 'A prompt (repeat the flag for a batch of prompts).')
  flags.DEFINE_integer('max_new_tokens', 64, 'Tokens to generate after each prompt.')
  flags.DEFINE_float('temperature', 0.0, 'Sampling temperature; 0 is greedy.')
  flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling: keep the most likely tokens up to this probability mass.')
  flags.DEFINE_integer('seed', 0, 'Random seed of the sampling.')
  cli.cli(_main)
