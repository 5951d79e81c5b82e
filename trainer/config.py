"""The one config tree: typed dataclasses (OmegaConf structured configs), YAML recipes, CLI overrides.

    cfg = load_config("recipes/quickstart.yaml", ["pretrain.lr=1e-3", "parallel.tp=2"])

Merge order: schema defaults <- model preset <- recipe YAML <- command line. Unknown keys, wrong
types, missing required values (`???`) and unknown stage names are errors naming the key, raised
before any heavy work. Stages reference each other's outputs by interpolation, e.g.
`sft.init: ${pretrain.output}`, so no path is copied by hand.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from model.config import ModelConfig, PRESETS, check_preset, resolve_granularity, validate_model_config

STAGES = ("tokenize", "pretrain", "transition", "sft", "dpo", "export", "evaluate",
          "premises", "select", "rerank",  # premise selection (trainer/premise_stage.py, premise_select.py, premise_rerank.py)
          "vision_sft")  # image-text SFT (trainer/vision_sft.py)
# stages that train on every rank of the job (the others run on rank 0): the layout is checked up front,
# and a SLURM job may give each its own node count (slurm.stage_nodes)
TRAINING_STAGES = ("pretrain", "transition", "sft", "dpo", "select", "rerank", "vision_sft")


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel degree (attention heads, vocab, expert hidden if expert_tp)
    ep: int = 1  # expert parallel degree (experts split over ep ranks inside data parallel)
    sp: bool = False  # sequence parallelism for norms/residuals (needs tp > 1)
    expert_tp: bool = False  # also split each expert's hidden dim over the tp group
    zero_stage: int = 1  # DeepSpeed ZeRO stage over the data-parallel group: 0, 1 or 2
    moe_impl: str = "dropless"  # dropless (grouped GEMM, all-to-all) | deepspeed (classic, capacity)
    capacity_factor: float = 1.0  # moe_impl=deepspeed only
    activation_checkpointing: str = "none"  # none | full (whole blocks) | selective (op-level, parallel/parallelize.py)
    # a collective (any process group) waiting longer fails its rank, so a hung or unreachable rank ends
    # the job instead of stalling it; must exceed the longest wait on one rank (rank-0 stages, saves)
    collective_timeout_s: int = 600


@dataclass
class TrainConfig:
    """What every training stage (pretrain, sft, dpo) shares."""
    init: Optional[str] = None  # start from: a checkpoint folder of this project or an HF Mixtral folder
    output: str = MISSING  # run folder: checkpoints, logs, resolved config
    steps: int = 100
    micro_batch_size: int = 4  # sequences per rank per forward/backward
    global_batch_size: int = 8  # sequences per optimizer step, over all data-parallel ranks
    seq_len: int = 256
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm (0: off)
    dtype: str = "fp32"  # fp32 | bf16 (bf16 weights and activations, fp32 master weights)
    seed: int = 1234
    save_every: int = 100  # steps between checkpoints (the last step is always saved)
    keep_last: int = 2  # checkpoints kept, newest first ...
    keep_every: int = 0  # ... plus every K-th step (0: none)
    log_every: int = 10
    eval_every: int = 0  # steps between held-out evaluations (0: only at the end, if there is a split)
    eval_batches: int = 4  # held-out rows per evaluation: eval_batches x micro_batch_size, any layout (0: all)
    stop_after: Optional[int] = None  # leave after this step as if interrupted (tests, time budgets)


@dataclass
class TokenizeStage:
    # .txt, .jsonl(.gz/.zst), .parquet files, folders of them, datasets saved to disk, or
    # {dataset, split, name, data_files, streaming} mappings for datasets.load_dataset (data/readers.py)
    inputs: list[Any] = field(default_factory=list)
    text_field: str = "text"
    output: str = "${run_dir}/data/corpus"  # prefix: shards + prefix.manifest.json (data/sharded.py)
    num_workers: int = 0  # processes encoding documents (0: every core)
    shard_tokens: int = 1 << 30  # a new shard once one holds this many tokens


@dataclass
class PretrainStage(TrainConfig):
    # a dataset prefix, or a weighted mixture [{path: PREFIX, weight: W}, ...] (data/mixture.py)
    data: Any = "${tokenize.output}"
    valid_fraction: float = 0.0  # documents held out for eval/loss (every eval_every steps and at the end)
    output: str = "${run_dir}/pretrain"


@dataclass
class TransitionStage(PretrainStage):
    """Transition tuning (trainer/transition.py): a Mixture of Tokens checkpoint becomes the token-choice
    sparse MoE of the same experts (router from the controller, the checkpoint's model.top_k) and trains on."""
    init: Optional[str] = "${pretrain.output}"  # a Mixture of Tokens run folder or checkpoint
    valid_fraction: float = 0.05  # held-out documents: the loss before and after the switch is measured on them
    output: str = "${run_dir}/transition"
    steps: int = 50
    warmup_steps: int = 5


@dataclass
class AnswerEvalConfig:
    """Greedy answers to held-out chat prompts at every evaluation (trainer.generation)."""
    eval_prompts: Optional[str] = None  # chat jsonl (last answers = references); sft: held_out (its split)
    eval_prompts_limit: int = 0  # prompts per evaluation (0: all)
    eval_max_new_tokens: int = 64  # longest answer generated


@dataclass
class SFTStage(AnswerEvalConfig, TrainConfig):
    data: str = MISSING  # jsonl of {"messages": [{"role", "content"}, ...]}
    valid_fraction: float = 0.05  # held-out conversations for loss and token accuracy
    skip_bad_records: bool = False  # count and skip malformed records instead of failing
    init: Optional[str] = "${pretrain.output}"
    output: str = "${run_dir}/sft"
    lr: float = 1e-4
    warmup_steps: int = 5


@dataclass
class DPOStage(AnswerEvalConfig, TrainConfig):
    data: str = MISSING  # jsonl of {"prompt", "chosen", "rejected"}
    skip_bad_records: bool = False
    init: Optional[str] = "${sft.output}"
    output: str = "${run_dir}/dpo"
    beta: float = 0.1
    loss: str = "sigmoid"  # sigmoid | ipo | hinge | robust
    label_smoothing: float = 0.0  # sigmoid and robust only
    reference: str = "precompute"  # precompute (one pass before training) | copy (frozen model copy)
    rpo_alpha: float = 0.0  # + rpo_alpha x chosen answer's NLL per token (RPO, TRL's rpo_alpha)
    lr: float = 5e-6
    warmup_steps: int = 2


@dataclass
class ExportStage:
    checkpoint: str = "${pretrain.output}"  # a run folder (its latest checkpoint) or a checkpoint
    output: str = "${run_dir}/hf"
    dtype: str = "bf16"  # weights dtype in the safetensors files: fp32 | bf16
    max_shard_size: str = "2GB"
    sample_prompt: Optional[str] = None  # generate from the export with transformers to check it


@dataclass
class EvaluateStage:
    """Held-out evaluation (trainer/evaluate.py): perplexity and routing per corpus, passkey retrieval,
    lm-eval tasks; eval.json and figures in `output`."""
    checkpoint: str = "${pretrain.output}"  # a run folder, a checkpoint or an HF Mixtral folder
    output: str = "${run_dir}/eval"
    corpora: dict[str, str] = field(default_factory=dict)  # name -> .jsonl / .txt file or indexed prefix
    text_field: str = "text"
    seq_len: int = 0  # window of the perplexity and routing passes (0: the model's max_seq_len)
    max_tokens: int = 16384  # predicted tokens per corpus (0: all)
    batch_size: int = 8  # rows per forward pass
    passkey_lengths: list[int] = field(default_factory=list)  # tokens; empty: max_seq_len / 8, / 4, / 2, x 1
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_trials: int = 4  # keys per (length, depth) cell (0: no passkey test)
    lm_eval_tasks: list[str] = field(default_factory=list)  # lm-evaluation-harness task names (optional package)
    lm_eval_include: Optional[str] = "data/eval/lm_eval"  # folder of local task YAMLs
    lm_eval_model: Optional[str] = None  # HF folder lm-eval runs on (default: `checkpoint` if it is one)
    lm_eval_limit: int = 0  # examples per task (0: all)
    dtype: str = "fp32"  # fp32 | bf16
    seed: int = 0  # passkey keys


@dataclass
class LoggingConfig:
    wandb: str = "offline"  # offline | online (only when WANDB_API_KEY is set) | disabled
    project: str = "moe-train"
    progress: bool = True  # progress bar on rank 0


@dataclass
class SlurmConfig:
    nodes: int = 1
    stage_nodes: dict[str, int] = field(default_factory=dict)  # per training stage, e.g. {sft: 1}; default nodes
    gpus_per_node: int = 8  # 0: a CPU job (gloo)
    tasks_per_node: Optional[int] = None  # ranks per node; default gpus_per_node (required when it is 0)
    partition: Optional[str] = None  # required when nodes > 1
    account: Optional[str] = None
    time: str = "04:00:00"
    cpus_per_task: int = 8
    signal_seconds: int = 120  # SIGUSR1 this long before the time limit: checkpoint and requeue
    extra_sbatch: list[str] = field(default_factory=list)  # more "#SBATCH" options, verbatim
    env: dict[str, str] = field(default_factory=dict)  # exported in the batch script


@dataclass
class RecipeConfig:
    run_dir: str = "runs/default"
    base: Optional[str] = None  # an HF Mixtral folder the recipe starts from: stages refer to ${base}
    stages: list[str] = field(default_factory=lambda: ["pretrain"])  # run in this order
    tokenizer: str = "mistral-v1"  # the Mixtral tokenizer shipped in mistral-common, or an HF folder
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    tokenize: TokenizeStage = field(default_factory=TokenizeStage)
    pretrain: PretrainStage = field(default_factory=PretrainStage)
    transition: TransitionStage = field(default_factory=TransitionStage)
    sft: SFTStage = field(default_factory=SFTStage)
    dpo: DPOStage = field(default_factory=DPOStage)
    export: ExportStage = field(default_factory=ExportStage)
    evaluate: EvaluateStage = field(default_factory=EvaluateStage)
    premises: "PremisesStage" = field(default_factory=lambda: PremisesStage())
    select: "SelectStage" = field(default_factory=lambda: SelectStage())
    rerank: "RerankStage" = field(default_factory=lambda: RerankStage())
    vision_sft: "VisionSFTStage" = field(default_factory=lambda: VisionSFTStage())


class ConfigError(ValueError):
    """A recipe or override is wrong; the message names the file, key or value."""


def load_config(recipe: Optional[str] = None, overrides: Optional[list[str]] = None) -> DictConfig:
    """Schema <- preset <- recipe <- overrides, then validated. Errors are ConfigError."""
    layers = []
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {recipe}")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as e:  # yaml syntax errors carry line and column
            raise ConfigError(f"{recipe}: cannot parse YAML: {e}") from e
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"command-line override {item!r} is not of the form key=value")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides or [])))
    except OmegaConfBaseException as e:
        raise ConfigError(f"command line: {e}") from e

    preset = None
    for layer in layers:
        preset = OmegaConf.select(layer, "model.preset", default=preset)
    try:
        check_preset(preset)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    base = OmegaConf.merge(OmegaConf.structured(RecipeConfig),
                           {"model": PRESETS.get(preset, {})})
    for layer, source in zip(layers, [recipe or "command line"] * (len(layers) - 1) + ["command line"]):
        try:
            base = OmegaConf.merge(base, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{source}: {_describe(e)}") from e
    explicit = {key for layer in layers for key in ("num_experts",)
                if OmegaConf.select(layer, f"model.{key}") is not None}
    try:
        base = OmegaConf.merge(base, {"model": resolve_granularity(
            OmegaConf.to_container(base.model, resolve=True), explicit)})
    except ValueError as e:
        raise ConfigError(str(e)) from e
    validate(base)
    return base


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    if "not in" in msg and key:
        return f"unknown config key '{key}'"
    return f"key '{key}': {msg}" if key else msg


def validate(cfg: DictConfig) -> None:
    """Checks that need no allocation: stage names, required values of the stages that run, model."""
    for stage in cfg.stages:
        if stage not in STAGES:
            raise ConfigError(f"stages: unknown stage {stage!r}; choose from {list(STAGES)}")
    for stage in cfg.stages:
        for key in _missing_keys(cfg[stage], stage):
            raise ConfigError(f"{key}: a value is required (stage '{stage}' runs)")
    try:
        validate_model_config(model_config_of(cfg))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    p = cfg.parallel
    if p.zero_stage not in (0, 1, 2):
        raise ConfigError(f"parallel.zero_stage must be 0, 1 or 2, got {p.zero_stage}")
    if p.moe_impl not in ("dropless", "deepspeed"):
        raise ConfigError(f"parallel.moe_impl must be dropless or deepspeed, got {p.moe_impl!r}")
    if p.activation_checkpointing not in ("none", "full", "selective"):
        raise ConfigError("parallel.activation_checkpointing must be none, full or selective, "
                          f"got {p.activation_checkpointing!r}")
    if p.collective_timeout_s < 1:
        raise ConfigError(f"parallel.collective_timeout_s must be >= 1, got {p.collective_timeout_s}")
    if p.ep > 1 and p.zero_stage == 0:
        raise ConfigError(f"parallel.ep={p.ep} needs parallel.zero_stage 1 or 2: DeepSpeed's stage-0 gradient "
                          "clipping averages the ranks' norms, which differ under expert parallelism")
    if p.moe_impl == "deepspeed" and p.tp > 1:
        raise ConfigError(f"parallel.moe_impl=deepspeed with parallel.tp={p.tp}: DeepSpeed's classic MoE splits "
                          "expert capacity over tp and never sums the partial expert gradients; use dropless")
    _validate_mixture_of_tokens(cfg)
    _validate_data(cfg)
    for stage in ("pretrain", "transition", "sft"):
        if stage in cfg.stages and not 0 <= cfg[stage].valid_fraction < 1:
            raise ConfigError(f"{stage}.valid_fraction must be in [0, 1), got {cfg[stage].valid_fraction}")
    for stage in ("pretrain", "transition", "sft", "dpo"):
        if stage in cfg.stages and cfg[stage].dtype not in ("fp32", "bf16"):
            raise ConfigError(f"{stage}.dtype must be fp32 or bf16, got {cfg[stage].dtype!r}")
        if stage in cfg.stages and cfg[stage].dtype == "bf16" and p.zero_stage == 0:
            raise ConfigError(f"{stage}.dtype=bf16 needs parallel.zero_stage 1 or 2 (DeepSpeed's stage-0 bf16 "
                              "optimizer keeps its fp32 state where checkpoints cannot read it)")
    for stage in ("sft", "dpo"):
        if stage in cfg.stages:
            _validate_answer_eval(cfg[stage], stage)
    if "dpo" in cfg.stages and cfg.dpo.rpo_alpha < 0:
        raise ConfigError(f"dpo.rpo_alpha must be >= 0, got {cfg.dpo.rpo_alpha}")
    if "evaluate" in cfg.stages:
        validate_evaluate(cfg.evaluate)
    validate_premise_stages(cfg)


def validate_evaluate(e: DictConfig) -> None:
    """The evaluate stage's settings and corpus files (a corpus made by an earlier stage of the recipe
    may not exist yet: only .jsonl / .txt files are checked)."""
    if e.dtype not in ("fp32", "bf16"):
        raise ConfigError(f"evaluate.dtype must be fp32 or bf16, got {e.dtype!r}")
    for key in ("seq_len", "max_tokens", "passkey_trials", "lm_eval_limit"):
        if e[key] < 0:
            raise ConfigError(f"evaluate.{key} must be >= 0, got {e[key]}")
    if e.batch_size < 1 or any(n < 1 for n in e.passkey_lengths):
        raise ConfigError(f"evaluate.batch_size and evaluate.passkey_lengths must be >= 1, got {e.batch_size} "
                          f"and {list(e.passkey_lengths)}")
    if any(not 0 <= d <= 1 for d in e.passkey_depths):
        raise ConfigError(f"evaluate.passkey_depths must be in [0, 1], got {list(e.passkey_depths)}")
    for name, path in e.corpora.items():
        if Path(path).suffix in (".jsonl", ".txt") and not Path(path).is_file():
            raise ConfigError(f"evaluate.corpora.{name}: no such file: {path}")
    if e.lm_eval_tasks:
        import importlib.util
        if importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("evaluate.lm_eval_tasks needs lm-evaluation-harness: pip install lm-eval==0.4.13")


def _validate_mixture_of_tokens(cfg: DictConfig) -> None:
    if "transition" in cfg.stages and cfg.transition.valid_fraction <= 0:
        raise ConfigError("transition.valid_fraction must be > 0: the loss before and after the switch to "
                          "sparse is measured on the held-out documents")
    if cfg.model.moe_type != "tokens":
        return
    if cfg.parallel.moe_impl != "dropless":
        raise ConfigError("model.moe_type=tokens needs parallel.moe_impl=dropless")
    for stage in ("sft", "dpo"):
        if stage in cfg.stages:
            raise ConfigError(f"model.moe_type=tokens in stage '{stage}': a Mixture of Tokens is a pretraining "
                              "layer (it mixes the requests of a batch); run the transition stage and fine-tune "
                              "its output with model.moe_type=sparse")
    G, rows = cfg.model.mot_group_size, cfg.pretrain.micro_batch_size
    if "pretrain" in cfg.stages and rows > G and rows % G:
        raise ConfigError(f"pretrain.micro_batch_size ({rows}) is not divisible by model.mot_group_size ({G})")


def _validate_data(cfg: DictConfig) -> None:
    """The tokenize settings and the pretraining data's form (a prefix or {path, weight} sources); that
    the prefixes exist is checked when the stages start (an earlier stage may write them)."""
    from data.mixture import parse_mixture
    from data.readers import DataError, hub_spec

    t = cfg.tokenize
    if "tokenize" in cfg.stages:
        if t.num_workers < 0 or t.shard_tokens < 1:
            raise ConfigError(f"tokenize.num_workers must be >= 0 (0: every core) and tokenize.shard_tokens "
                              f">= 1, got {t.num_workers} and {t.shard_tokens}")
        for i, item in enumerate(OmegaConf.to_container(t.inputs, resolve=True)):
            if not isinstance(item, (dict, str)) or not item:
                raise ConfigError(f"tokenize.inputs[{i}]: expected a path or a dataset mapping, got {item!r}")
            try:
                if isinstance(item, dict):
                    hub_spec(item)
            except DataError as e:
                raise ConfigError(f"tokenize.inputs[{i}]: {e}") from None
    for stage in ("pretrain", "transition"):
        if stage in cfg.stages:
            try:
                parse_mixture(pretrain_data(cfg[stage]), f"{stage}.data")
            except DataError as e:
                raise ConfigError(str(e)) from None


def pretrain_data(scfg: DictConfig):
    """A pretraining stage's `data` as plain Python: a prefix string or a list of {path, weight}."""
    data = scfg.data
    return OmegaConf.to_container(data, resolve=True) if OmegaConf.is_config(data) else data


def _validate_answer_eval(scfg: DictConfig, stage: str) -> None:
    if scfg.eval_prompts == "held_out" and stage == "dpo":
        raise ConfigError("dpo.eval_prompts=held_out: DPO holds out no conversations; give a chat jsonl")
    if scfg.eval_prompts not in (None, "held_out") and not Path(scfg.eval_prompts).is_file():
        raise ConfigError(f"{stage}.eval_prompts: no such file: {scfg.eval_prompts}")
    if scfg.eval_max_new_tokens < 1 or scfg.eval_prompts_limit < 0:
        raise ConfigError(f"{stage}.eval_max_new_tokens must be >= 1 and {stage}.eval_prompts_limit >= 0, "
                          f"got {scfg.eval_max_new_tokens} and {scfg.eval_prompts_limit}")


def _missing_keys(node: DictConfig, prefix: str):
    for key in node:
        full = f"{prefix}.{key}"
        if OmegaConf.is_missing(node, key):
            yield full
        elif isinstance(node[key], DictConfig):
            yield from _missing_keys(node[key], full)


def model_config_of(cfg: DictConfig) -> ModelConfig:
    return ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))


def save_config(cfg: DictConfig, path) -> None:
    """The resolved config, as run: saved into every run folder and checkpoint."""
    Path(path).write_text(OmegaConf.to_yaml(cfg, resolve=True))


@dataclass
class PremisesStage:
    """A Metamath database -> premise-selection split and the tuned BM25 baseline (trainer/premise_stage.py)."""
    database: str = "apt"  # a .mm file | a metamath-databases .deb | apt: `apt-get download` into cache_dir
    cache_dir: str = "~/.cache/moe-train/metamath"
    output: str = "${run_dir}/premises"
    valid_fraction: float = 0.05  # the last theorems (library order) held out
    bm25_tune_queries: int = 300  # last train theorems BM25's tokenization/k1/b are tuned on (0: no BM25)


@dataclass
class SelectStage(TrainConfig):
    """SELECT (trainer/premise_select.py): the decoder as a bi-encoder, InfoNCE over the global batch."""
    data: str = "${premises.output}"
    output: str = "${run_dir}/select"
    seq_len: int = 128  # tokens kept of each statement
    temperature: float = 0.05
    extra_negatives: int = 16  # random corpus premises per rank per micro-batch, next to in-batch ones
    logq_correction: bool = True  # subtract log(sampling rate) of each premise column (trainer/premise_loss.py)
    eval_batch_size: int = 64  # rows per forward pass when embedding the corpus
    eval_queries: int = 0  # held-out theorems per evaluation, the last ones (0: all)


@dataclass
class RerankStage(TrainConfig):
    """RERANK (trainer/premise_rerank.py): a cross-encoder on the SELECT backbone, BCE on SELECT's hard
    negatives; re-scores SELECT's top rerank_k of each held-out theorem."""
    data: str = "${premises.output}"
    init: Optional[str] = "${select.output}"  # the SELECT model (a select run or its HF export): starts the cross-encoder, mines the negatives
    output: str = "${run_dir}/rerank"
    seq_len: int = 128  # tokens of theorem + premise (the premise keeps at most half)
    select_seq_len: int = "${select.seq_len}"  # tokens of a statement as SELECT embeds it (mining)
    negatives: int = 7  # hard negatives per cited premise, drawn from its theorem's SELECT top mine_k
    mine_k: int = 64
    mine_theorems: int = 0  # train theorems mined, a seeded sample (0: all)
    rerank_k: int = 64  # SELECT's top K of each held-out theorem re-scored
    eval_batch_size: int = 64  # rows per forward pass when embedding or scoring
    eval_queries: int = 0  # held-out theorems evaluated, the last ones (0: all)
    export_hf: Optional[str] = None  # write the result as an HF Mixtral folder + rerank_head.safetensors


def validate_premise_stages(cfg: DictConfig) -> None:
    if "premises" in cfg.stages and not 0 < cfg.premises.valid_fraction < 1:
        raise ConfigError(f"premises.valid_fraction must be in (0, 1), got {cfg.premises.valid_fraction}")
    if "select" in cfg.stages:
        s = cfg.select
        if cfg.parallel.sp:
            raise ConfigError("parallel.sp with stage 'select': the pooled embedding needs whole sequences; "
                              "set parallel.sp=false")
        if s.temperature <= 0 or s.extra_negatives < 0 or s.eval_batch_size < 1 or s.eval_queries < 0:
            raise ConfigError("select.temperature must be > 0, select.extra_negatives and select.eval_queries "
                              f">= 0, select.eval_batch_size >= 1; got {s.temperature}, {s.extra_negatives}, "
                              f"{s.eval_queries}, {s.eval_batch_size}")
    if "rerank" in cfg.stages:
        r = cfg.rerank
        if cfg.parallel.sp:
            raise ConfigError("parallel.sp with stage 'rerank': the score reads a row's last token; set parallel.sp=false")
        if r.init is None:
            raise ConfigError("rerank.init: the SELECT model to start from is required (a select run or its HF export)")
        bad = {k: r[k] for k in ("seq_len", "select_seq_len", "mine_k", "rerank_k", "eval_batch_size") if r[k] < 1}
        bad.update({k: r[k] for k in ("negatives", "mine_theorems", "eval_queries") if r[k] < 0})
        if bad or r.seq_len < 2:
            raise ConfigError(f"rerank: {bad or {'seq_len': r.seq_len}}: seq_len must be >= 2, select_seq_len, mine_k, "
                              "rerank_k and eval_batch_size >= 1, negatives, mine_theorems and eval_queries >= 0")


@dataclass
class VisionSFTStage(TrainConfig):
    """Image-text SFT of model/multimodal.py (trainer/vision_sft.py); the decoder needs the Tekken
    vocabulary (model.vocab_size=131072)."""
    data: str = MISSING  # jsonl of {"messages"}; a user content may list {"type": "image", "path"} parts
    eval_data: Optional[str] = None  # held-out jsonl (None: valid_fraction of data)
    valid_fraction: float = 0.05
    skip_bad_records: bool = False  # count and skip bad records (missing images too) instead of failing
    init: Optional[str] = None  # the decoder: a text run/checkpoint of ours or an HF Mixtral folder (None: random)
    vision_preset: str = "debug"  # a fresh encoder (model/vision.py VISION_PRESETS) ...
    vision_init: Optional[str] = None  # ... or the encoder (and projector if it fits) of an HF Llava folder
    freeze: list[str] = field(default_factory=list)  # parts kept fixed: vision, projector, decoder
    export_hf: Optional[str] = None  # write the result as a LlavaForConditionalGeneration folder
    output: str = "${run_dir}/vision_sft"
    lr: float = 1e-4
    warmup_steps: int = 5
