"""Import a local HuggingFace checkpoint (Llama, Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE) as a moejax workdir.

  python -m moejax.import_hf --hf_dir=DIR --workdir=OUT [--data_source=jsonl:held_out/*.jsonl] [--seq_len=N]

Flags, then one call of `moejax.interop.importer.import_checkpoint` (docs/interop.md). Then
  python -m moejax.main --config=OUT/experiment.py --workdir=OUT --mode=eval   (held-out loss on --data_source)
  python -m moejax.generate --workdir=OUT --prompt=...                        (sampling)
  python -m moejax.main --config=OUT/experiment.py --workdir=OUT             (fine-tuning from the weights)
Without --data_source the workdir has no corpus, and scoring or fine-tuning it says so.
Bad input, an interruption or a full disk is one error line, and nothing is left under OUT.
"""

from __future__ import annotations

from absl import app, flags

from moejax import cli
from moejax.errors import WorkdirError

FLAGS = flags.FLAGS


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.seq_len is not None and FLAGS.seq_len < 2:
    raise WorkdirError(f'--seq_len={FLAGS.seq_len} must be >= 2')
  from moejax.interop import importer  # pylint: disable=import-outside-toplevel  (jax loads only after the flags)
  layout = importer.import_checkpoint(FLAGS.hf_dir, FLAGS.workdir, FLAGS.data_source, FLAGS.seq_len)
  corpus = '' if FLAGS.data_source else ' --config.data.source=SOURCE --allow_config_change'
  print(f'{FLAGS.hf_dir} ({layout}) -> {FLAGS.workdir}; evaluate with: python -m moejax.main '
        f'--config={FLAGS.workdir}/experiment.py --workdir={FLAGS.workdir} --mode=eval{corpus}')


if __name__ == '__main__':
  flags.DEFINE_string('hf_dir', None, 'A local HuggingFace checkpoint directory.', required=True)
  flags.DEFINE_string('workdir', None, 'The moejax workdir to create (must not exist, or be empty).', required=True)
  flags.DEFINE_string('data_source', None, 'data.source of the imported config (held-out data for --mode=eval); '
                      'without it the workdir has no corpus until --config.data.source names one.')
  flags.DEFINE_integer('seq_len', None, 'data.seq_len; default min(max_position_embeddings, 4096).')
  cli.cli(_main)
