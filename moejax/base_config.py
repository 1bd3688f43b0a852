"""Every moejax config key, with its default and a one-line meaning.

Experiment files start from `base.get_config()` and set only their deltas.
docs/configs.md explains each key in more depth; `moejax/config.py` checks
the cross-field rules before anything compiles.

Run:  python -m moejax.main --config=experiments/base.py --workdir=/tmp/base
"""

import ml_collections
from ml_collections import FieldReference


def get_config(arg=None):
  """Returns the default config (a small MoE LM on the Python stdlib bytes)."""
  del arg
  c = ml_collections.ConfigDict()
  c.name = 'base'  # label of this run in result tables
  c.seed = 0  # model-init seed; per-layer keys are folded in from it

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = FieldReference(None, field_type=int)  # None -> the tokenizer's (bytes: 257 = 256 bytes + separator); set, it must match
  m.allow_padded_vocab = False  # accept a model.vocab_size above the tokenizer's (unused rows, as OLMoE's 50304 for 50280 tokens)
  m.model_dim = 128  # residual width D
  m.num_layers = 4  # decoder blocks
  m.num_heads = 4  # query heads H
  m.num_kv_heads = 4  # key/value heads (grouped-query attention); divides num_heads
  m.head_dim = FieldReference(None, field_type=int)  # per-head width; None -> model_dim // num_heads
  m.ffn_hidden = 512  # hidden size F of the dense SwiGLU FFN
  m.rope_base = 10000.0  # rotary-embedding base wavelength
  m.use_qk_norm = False  # RMSNorm over each query and key head before rotary (OLMoE, Qwen3)
  m.qk_norm_scope = 'head'  # QK-norm over each head's d_h ('head', Qwen3) or the whole H*d_h projection ('projection', OLMoE)
  m.use_qkv_bias = False  # biases on the query, key and value projections (Qwen2-MoE)
  m.use_tied_embeddings = True  # reuse the input embedding as the output projection
  m.norm_eps = 1e-6  # RMSNorm epsilon
  m.init_std = 0.02  # std of normal weight init (output projections scaled by 1/sqrt(2 * num_layers))
  m.compute_dtype = 'float32'  # 'float32' or 'bfloat16' matmuls; params and router stay float32
  m.attention = 'xla'  # attention core: 'xla' (jax.nn.dot_product_attention), 'blockwise' (flash in jnp), 'cudnn' (GPU), 'splash' (TPU Pallas), 'auto'
  m.attention_q_block = 512  # 'blockwise'/'splash': queries per block (clipped to the sequence length)
  m.attention_kv_block = 512  # 'blockwise'/'splash': keys per block; scores held at once: H x q_block x kv_block
  m.scan_layers = False  # run each repeating period of identical blocks as one jax.lax.scan over parameters stored stacked (checkpoints stay per layer)
  m.remat = 'none'  # rematerialize each block in the backward pass: 'none', 'full' (keep block inputs), 'moe' (also keep the routing), 'dots' (keep matmul outputs)

  c.moe = e = ml_collections.ConfigDict()
  e.num_experts = 8  # routed experts E per MoE layer; 0 makes a dense model
  e.experts_per_token = 2  # top-k routed experts per token
  e.expert_hidden = FieldReference(None, field_type=int)  # hidden size of each expert; None -> model.ffn_hidden
  e.first_dense_layers = 0  # layers [0, n) keep the dense FFN
  e.every_n_layers = 1  # after those, layer i is MoE when (i - first_dense_layers) % n == 0
  e.expert_size_classes = ''  # heterogeneous experts, e.g. '32x64,32x192' (count x hidden, counts sum to num_experts); '' = uniform
  e.num_shared_experts = 0  # always-active shared SwiGLU experts
  e.shared_expert_hidden = FieldReference(None, field_type=int)  # hidden size of each shared expert; None -> expert hidden
  e.use_shared_expert_gate = False  # multiply the shared output by sigmoid(x . w) (Qwen2-MoE style)
  e.routing = 'token_choice'  # 'token_choice' (each token takes its top-k experts) or 'expert_choice' (each expert takes its top-C tokens at each position of the batch)
  e.router_score = 'softmax'  # 'softmax' over experts (Switch/OLMoE/Mixtral) or per-expert 'sigmoid' (DeepSeek-V3)
  e.use_renormalized_gates = False  # softmax: divide the top-k gates by their sum (Mixtral); sigmoid always renormalizes
  e.routed_scaling_factor = 1.0  # multiplies the routed gates (DeepSeek-V3 uses 2.5)
  e.num_expert_groups = 1  # group-limited routing: experts split into this many groups
  e.topk_expert_groups = 1  # ... and each token picks only from its best groups
  e.router_jitter = 0.0  # training-only multiplicative noise U(1-eps, 1+eps) on the router input (Switch)
  e.load_balancing = 'global_batch'  # 'none', 'global_batch', 'micro_batch', 'sequence' (aux losses) or 'aux_free' (bias)
  e.balance_group_sequences = 1  # sequences per micro-batch for load_balancing='micro_batch'
  e.aux_loss_coef = 0.01  # weight alpha of the load-balancing loss (mean over MoE layers)
  e.bias_update_rate = 1e-3  # aux_free: b <- b + rate * sign(mean load - load) after each step
  e.aux_free_sequence_coef = 0.0  # aux_free: weight of the complementary sequence-wise loss (DeepSeek-V3: 1e-4)
  e.z_loss_coef = 1e-3  # router z-loss weight beta (mean over MoE layers)
  e.train_capacity_factor = FieldReference(None, field_type=float)  # token dropping in training; None = dropless
  e.eval_capacity_factor = FieldReference(None, field_type=float)  # token dropping in evaluation; None = dropless
  e.drop_policy = 'position'  # over capacity keep: 'position' (first come, first choices first) or 'probs' (top gates)
  e.capacity_group_tokens = FieldReference(None, field_type=int)  # tokens per capacity group; None -> the whole batch
  e.dispatch = 'block'  # 'block' (sorted block-padded), 'ragged' (lax.ragged_dot), 'capacity' ([E, C] slots), 'dense' (reference)
  e.block_size = FieldReference(None, field_type=int)  # rows per block for 'block' dispatch; None -> automatic
  e.expert_parallel_capacity_factor = FieldReference(None, field_type=float)  # EP buffer: all_to_all rows per destination ceil(f*T_local*k/P), ragged receive rows ceil(f*T_local*k); None -> never drops
  e.expert_parallel_exchange = 'auto'  # 'all_to_all' (padded rows per destination) or 'ragged' (ragged_all_to_all); 'auto': ragged on GPU/TPU
  e.kernels = 'auto'  # router + 'block' dispatch: 'reference', 'xla' (gather-only VJPs), 'pallas', 'auto' (per platform)
  c.data = d = ml_collections.ConfigDict()
  d.source = 'stdlib'  # 'stdlib' (this interpreter's *.py), 'text:GLOB', 'jsonl:GLOB', 'parquet:GLOB', 'tfds:NAME' or 'store:DIR' (moejax.prepare)
  d.tokenizer = 'bytes'  # 'bytes', 'sentencepiece:PATH', 'hf:PATH' (tokenizer.json), 'train:bpe:N' or 'train:unigram:N'
  d.separator_token = FieldReference(None, field_type=str)  # a tokenizer file's token that starts documents; None -> a known special token
  d.tokenizer_train_bytes = 200 << 20  # a 'train:' tokenizer learns from at most this many training bytes, in document order
  d.tfds_split = 'train'  # split read by a 'tfds:' source
  d.tfds_text_key = 'text'  # feature holding the document text in a 'tfds:' source
  d.tfds_data_dir = FieldReference(None, field_type=str)  # tfds data_dir; None -> tfds default
  d.text_field = 'text'  # JSON field / Parquet column holding the document text ('jsonl:', 'parquet:')
  d.cache_dir = FieldReference(None, field_type=str)  # where subword-tokenized in-memory sources are cached as stores; None -> $MOEJAX_CACHE or ~/.cache/moejax
  d.verify_store = 'full'  # opening a store: 'full' (sha256 and token range of every shard) or 'size' (sizes only)
  d.read_threads = 2  # grain threads reading training windows ahead of the step
  d.prefetch_batches = 4  # training batches read ahead (bounds host memory: batch bytes x this)
  d.seq_len = 128  # tokens per training sequence
  d.document_mask = False  # attention stays inside each document (separator-started segments), rotary positions restart per document
  d.heldout_bytes = 131072  # held-out split: documents in key-hash order, at most this many bytes in all
  d.heldout_max_fraction = 0.1  # ... and at most this share of the corpus bytes (a warning says when it binds)
  d.binary_documents = 'error'  # a document that looks binary (NUL bytes, >5% control bytes): 'error', 'skip' or 'keep'
  d.seed = 0  # data-order seed; equal seeds give paired data order across configs

  c.optim = o = ml_collections.ConfigDict()
  o.peak_learning_rate = 2e-3  # AdamW learning rate after warmup
  o.warmup_fraction = 0.05  # fraction of train.steps spent in linear warmup from 0
  o.schedule = 'cosine'  # after warmup: 'cosine' decay, or 'wsd' (hold the peak, then decay linearly over decay_fraction)
  o.decay_fraction = 0.2  # wsd: the last share of the steps spent decaying
  o.final_lr_fraction = 0.1  # the decay ends at this fraction of the peak
  o.decay_branches = ''  # wsd: also score shorter runs, e.g. '0.25,0.5': decays branched from the stable phase (loss vs tokens)
  o.adam_b1 = 0.9  # AdamW first-moment decay
  o.adam_b2 = 0.95  # AdamW second-moment decay
  o.adam_eps = 1e-8  # AdamW epsilon
  o.weight_decay = 0.1  # decoupled weight decay on weight matrices (never on norms or biases)
  o.grad_clip_norm = 1.0  # global gradient-norm clip; 0 disables

  c.train = t = ml_collections.ConfigDict()
  t.steps = 400  # optimizer steps
  t.batch_size = 32  # global sequences per step
  t.microbatches = 1  # gradient accumulation: the step runs the batch as this many equal microbatches (exactly the same update)
  t.log_every_steps = 50  # metrics to JSONL/TensorBoard every n steps
  t.peak_tflops = FieldReference(None, field_type=float)  # per-device peak for MFU; None -> looked up by device kind
  t.init_from = ''  # upcycling: a finished dense run's workdir whose weights start this MoE ('' = random init)
  t.init_from_router_std = 0.0  # upcycling: std of the router's normal init; 0 = zero router (first forward equals the dense one)
  t.init_from_noise = 0.0  # upcycling: each copied expert weight times (1 + this * N(0, 1)), drawn from seed; 0 = exact copies

  c.checkpoint = k = ml_collections.ConfigDict()
  k.every_steps = 200  # save every n steps (and always at the end)
  k.max_to_keep = 2  # checkpoints kept on disk
  k.keep_every_steps = FieldReference(None, field_type=int)  # also keep every checkpoint whose step is a multiple of n (moejax.routes); None = only the latest
  k.use_async = True  # write checkpoints in a background thread

  c.eval = v = ml_collections.ConfigDict()
  v.batch_size = 32  # held-out sequences per eval batch
  v.max_batches = FieldReference(None, field_type=int)  # cap on eval batches; None -> the whole held-out set
  v.every_steps = FieldReference(None, field_type=int)  # also score the held-out set every n steps (learning curve); None -> at the end only

  c.mesh = h = ml_collections.ConfigDict()
  h.data = 1  # data-parallel mesh axis size; one axis may be -1 = all remaining devices
  h.fsdp = 1  # parameter-sharding (FSDP) mesh axis size; batch is split over data*fsdp*expert
  h.expert = 1  # expert-parallel mesh axis size: experts split over it, tokens moved by all-to-all
  h.tensor = 1  # tensor-parallel mesh axis size (attention heads, FFN hidden)

  c.distributed = r = ml_collections.ConfigDict()
  r.mode = 'auto'  # 'auto' joins a multi-process run when the environment describes one; 'multi' always; 'single' never
  r.coordinator_address = ''  # host:port of process 0; '' -> JAX_COORDINATOR_ADDRESS or cluster auto-detection
  r.num_processes = FieldReference(None, field_type=int)  # with an address; None -> JAX_NUM_PROCESSES
  r.process_id = FieldReference(None, field_type=int)  # with an address; None -> JAX_PROCESS_ID
  r.initialization_timeout_s = 120  # joining takes at most this long, then one error line and exit 4

  # Experiment tracking (moejax/train/tracking.py): how a run is watched, never what it computes (no config hash).
  c.wandb = w = ml_collections.ConfigDict()
  w.mode = 'disabled'  # Weights & Biases: 'disabled', 'offline' (local files; `wandb sync` later) or 'online'; needs the wandb extra
  w.project = 'moejax'  # W&B project
  w.entity = ''  # W&B entity (user or team); '' -> your default entity
  w.name = ''  # W&B run name; '' -> the config's name
  w.group = ''  # W&B run group (e.g. a sweep's name); '' -> none
  w.tags = ''  # comma-separated W&B tags, e.g. 'e32,baseline'
  w.dir = ''  # where wandb writes its files (DIR/wandb/); '' -> the workdir
  return c
