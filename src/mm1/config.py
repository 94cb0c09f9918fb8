"""The configuration schema: one dataclass per component, composed into `Config`.

YAML presets live in `configs/`; a preset may name a `base:` preset it inherits from (paths are
relative to the preset's own file), so an ablation is a short file that overrides one to three
fields. Dotted overrides (`model.connector.kind=attnpool`) are merged last. Merging and type checks
are OmegaConf structured configs; the semantic checks (`validate`) run once at load time and raise
`ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mm1.data.kinds import KINDS
from mm1.registry import ConfigError, check_config
from mm1.registry import check as _check
from mm1.registry import one_of as _one_of

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# the values of data.caption_text and train.superclass_pool (the demo's flags offer the same)
CAPTION_TEXTS = ("caption", "tags")
SUPERCLASS_POOLS = ("mean", "lse")


@dataclass
class VisionConfig:
    """ViT image encoder. Position embeddings are learned for `image_size` and interpolated to any grid."""

    kind: str = "vit"
    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_dim: int = 512
    act: str = "gelu"  # gelu | quick_gelu (CLIP) | gelu_tanh (SigLIP)
    # pixels -> patch tokens: "patch" (ViT/CLIP patchify, what HF towers have) or "conv" (3x3 stride-2
    # convolutions, Xiao et al. 2021; measured in mm1.models.stems and docs/grounding.md section 10)
    stem: str = "patch"
    use_cls: bool = False
    pre_norm: bool = False  # CLIP applies a LayerNorm before the blocks
    post_norm: bool = True  # final LayerNorm over the returned features
    norm_eps: float = 1e-5
    feature_layer: int = -1  # which block's output feeds the connector (-2 = LLaVA's penultimate)
    # std of the learned position embeddings at init: 1.0 = the patch embeddings' own scale. The
    # common 0.02 leaves them ~50x below the content and the tiny ViT then hardly learns shape
    # (benchmarks/learnability.py, docs/grounding.md). Ignored when weights are loaded.
    pos_init_std: float = 1.0
    mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    hf_path: str = ""  # local HF CLIPVisionModel / SiglipVisionModel dir to load weights from

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class ConnectorConfig:
    """Vision-language connector: (B, h*w, D_v) -> (B, num_tokens, D_lm)."""

    kind: str = "c_abstractor"  # avgpool | attnpool | c_abstractor | mlp
    num_tokens: int = 16
    depth: int = 1  # ResNet/RegStage blocks before and after pooling (c_abstractor)
    mlp_depth: int = 2  # layers of the MLP readout
    hidden_dim: int = 0  # 0 = the vision width
    heads: int = 4  # attnpool cross-attention heads
    out_norm: float = 0.0  # > 0: RMS-normalise each output token to this L2 norm (learned gain); 0 = off


@dataclass
class LMConfig:
    """Llama-style decoder; MoE FFN every `moe_every` layers when `n_experts` > 0."""

    kind: str = "llama"
    vocab_size: int = 2048
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 = n_heads (no GQA)
    ffn_dim: int = 688
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_original_max_len: int = 0  # > 0: Llama-3 RoPE scaling (rope_scaling.original_max_position_embeddings)
    rope_factor: float = 8.0  # Llama-3 scaling: factor, low_freq_factor, high_freq_factor
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v
    n_experts: int = 0
    moe_every: int = 2
    moe_top_k: int = 2
    moe_lb_coef: float = 0.01
    moe_z_coef: float = 0.001
    attention: str = "auto"  # auto | sdpa | flex (document masking path for packed sequences)
    activation_checkpointing: bool = False
    hf_path: str = ""  # local HF Llama / Qwen2 dir to load weights from

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    image_token_id: int = 3  # the tokenizer's image-slot id; set from the tokenizer at build time
    subimage_grid: int = 0  # high resolution: g x g crops + 1 overview per image (0 = off)
    overview_first: bool = False  # MM1.5 puts the overview after the tiles

    @property
    def tokens_per_image(self) -> int:
        """Slot tokens one `<image>` expands to (k, times the sub-images at high resolution)."""
        crops = self.subimage_grid**2 + 1 if self.subimage_grid else 1
        return self.connector.num_tokens * crops


@dataclass
class SourceConfig:
    """One data source of a mixture; `path` may use `{world}` for the synthetic world's root."""

    kind: str = "caption"  # a registered data kind (mm1.data.kinds): caption | interleaved | text | sft
    path: str = ""
    weight: float = 1.0


def _default_sources() -> dict[str, SourceConfig]:
    return {
        "caption": SourceConfig("caption", "{world}/caption", 0.45),
        "interleaved": SourceConfig("interleaved", "{world}/interleaved", 0.45),
        "text": SourceConfig("text", "{world}/text", 0.10),
    }


@dataclass
class DataConfig:
    world: str = "data/world-tiny"  # built by `mm1 world` if missing
    world_preset: str = "tiny"  # the world's size preset (mm1 world --size), not the number of processes
    world_seed: int = 0
    tokenizer: str = ""  # tokenizer.json or HF model dir; "" = {world}/tokenizer.json
    sources: dict[str, SourceConfig] = field(default_factory=_default_sources)
    sft: str = "{world}/sft/train.json"
    synthetic_caption_ratio: float = 0.5  # share of caption samples using dense synthetic captions
    # what a caption pair's text is: "caption" (the alt-text, or the dense caption at the ratio above)
    # or "tags" (the image's labels, KEY.json "tags"): supervised targets for an encoder stage
    caption_text: str = "caption"
    seq_len: int = 256
    max_images: int = 16
    batch_size: int = 8  # sequences per rank per micro-step
    num_workers: int = 0
    resize: str = "crop"  # crop | pad
    # decoded images kept in memory per loader process (MiB, least recently used out first; 0 = none):
    # a corpus read many times skips decoding and resizing (mm1.data.loader.ImagePipeline)
    image_cache_mb: int = 0
    max_skip_rate: float = 0.05
    # records of a file read in a seeded permutation per epoch, within blocks of this many (held in
    # memory raw: paths for JSON sources, image bytes for tar shards); 1 = file order
    shuffle_block: int = 256
    # what untrusted data may make mm1 do (README "Security and trust"); the defaults are the safe side
    allow_commands: bool = False  # pipe:CMD and URL sources (a shell command / network per shard)
    allow_outside_paths: bool = False  # image paths in data/task files that leave the file's folder (or root)
    max_member_bytes: int = 64 * 1024 * 1024  # tar members and image files above this are skipped and counted
    image_formats: list[str] = field(default_factory=lambda: ["JPEG", "PNG", "WEBP"])  # decoders Pillow may use


@dataclass
class LRMultConfig:
    """Per-part multipliers of the peak LR (1.0 = the run's LR); weight decay per step is unchanged."""

    vision: float = 1.0
    connector: float = 1.0
    lm: float = 1.0


@dataclass
class TrainConfig:
    stage: str = "pretrain"  # encoder | pretrain | sft
    steps: int = 300
    lr: Optional[float] = None  # None = MM1 law eta(N)
    weight_decay: Optional[float] = None  # λ, decoupled: x (1 - λ·s_t) per step; None = 0.1 * lr (MM1)
    lr_mult: LRMultConfig = field(default_factory=LRMultConfig)  # per part: vision, connector, lm
    # train.lr unset: peak LR = the law x lr_scale (any stage), x sft_lr_scale too at stage=sft (MM1's SFT ran
    # at ~0.17x its law); lr_scale is for a stage the law was not fitted to, e.g. an encoder that learns shape
    # only at twice the law's rate in the demo's budget (docs/grounding.md section 24)
    lr_scale: float = 1.0
    sft_lr_scale: float = 0.17
    lr_law: str = ""  # lr_law.json from `mm1 hparams` ({a, b, wd_ratio}) used when lr is None; "" = MM1's law
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | wsd (flat at the peak, linear decay over the last decay_fraction)
    decay_fraction: float = 0.2  # schedule=wsd: share of the steps spent decaying to min_lr_ratio
    # > 0: end the run on the clock after this many seconds (schedule=wsd; train.steps stays a cap);
    # the decay starts at (1 - decay_fraction) of it and its end is re-projected each step
    time_budget_s: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_accum: int = 1
    clip: float = 1.0
    save_every: int = 100
    keep_last: int = 2
    save_consolidated: bool = False  # also write each checkpoint's weights as one model.safetensors
    seed: int = 0
    freeze_vision: bool = False
    freeze_connector: bool = False
    freeze_lm: bool = False
    init_from: str = ""  # a previous stage's run dir or checkpoint dir
    encoder_objective: str = "clip"  # clip | siglip | aim | superclass (stage=encoder)
    # how SuperClass pools the ViT's tokens into image logits: "mean" (the paper's) or "lse"
    # (log-sum-exp of per-token logits: each class must be found at some token, so tokens stay local)
    superclass_pool: str = "mean"
    # SuperClass: groups of tag words of which an image has one (the tiny preset: its background). Each
    # group is classified by a softmax of its own, weighted by superclass_group_weight, instead of
    # taking a share of the other words' softmax; [] = every word in one softmax
    superclass_groups: list[list[str]] = field(default_factory=list)
    superclass_group_weight: float = 1.0
    # stage=encoder, clip/siglip: groups of caption words swapped among themselves to make hard negative
    # captions (NegCLIP); [] = none. The tiny preset swaps the world's shape names.
    hard_negatives: list[list[str]] = field(default_factory=list)
    strategy: str = "auto"  # auto | single | ddp | fsdp
    data_shards: int = 0  # data-stream shards (0 = one per process); fixed = same global batch on any #processes
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    deterministic: bool = True
    nonfinite: str = "stop"  # stop | skip
    log_every: int = 1
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])  # + tensorboard, wandb (mm1.train.loggers)
    wandb_project: str = "mm1"
    wandb_mode: str = "offline"  # offline (no network, `wandb sync` later) | online | disabled
    eval_every: int = 50  # loss_probe / loss_shuffled (own vs deranged images, one fixed batch); 0 = off


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["world_caption", "world_vqa"])
    shots: list[int] = field(default_factory=lambda: [0, 4, 8])
    limit: int = 100
    trials: int = 1
    seed: int = 0
    batch_size: int = 16
    max_new_tokens: int = 20
    vqa_mode: str = "always"  # always (normalise every answer) | official (GT-Vision-Lab vqaEval.py)
    cider_tokenizer: str = "python"  # python (PTB-like) | java (Stanford PTBTokenizer via pycocoevalcap)
    add_bos: bool = False  # prepend BOS to prompts (HF LLMs trained with BOS; the world trains without)
    chat: bool = False  # wrap each query in the chat template (models after SFT)
    mc_normalize: str = "none"  # multiple choice: none (sum of log-probs) | length (mean per token)
    shuffled_control: bool = True  # also score each query with another item's image (score_shuffled, image_gain)
    mc_mode: str = "loglik"  # multiple choice: loglik (most likely option) | generate (parse a generated letter)
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda
    dtype: str = "auto"  # weights for eval/generate: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16


@dataclass
class Config:
    name: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------- loading


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """The preset and its `base:` ancestors, oldest first."""
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist; give a preset name ({', '.join(preset_names())}) or a YAML path"
        )
    if path in seen:
        raise ConfigError(f"{path}: `base:` chain loops back on itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    chain = _read_yaml_chain(path.parent / base, seen + (path,)) if base else []
    return chain + [data]


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), base: Config | None = None
) -> Config:
    """Load a preset (a name like `tiny` or a YAML path; or `base`, or the defaults), apply dotted
    overrides, validate, return a `Config`."""
    layers = [(str(path), layer) for layer in _read_yaml_chain(preset_path(path))] if path else []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. model.connector.kind=attnpool")
        key, value = item.split("=", 1)
        _refuse_resolvers(value, key)
        try:
            layers.append((f"override {item!r}", OmegaConf.from_dotlist([item])))
        except yaml.YAMLError as e:
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({_first_line(e)}); "
                "quote it, e.g. 'data.world=\"a:b\"'"
            ) from None
    return _build(layers, base)


def _build(layers: list[tuple[str, Any]], base: Config | None = None) -> Config:
    """Merge `(where, mapping)` layers over `base` (or the defaults), refusing resolver interpolations,
    and validate."""
    merged = OmegaConf.structured(base if base is not None else Config)
    for where, layer in layers:
        tree = layer if isinstance(layer, dict) else OmegaConf.to_container(layer)
        _refuse_resolvers(tree, "", where)
        _refuse_renamed(tree, where)
    try:
        for _, layer in layers:
            merged = OmegaConf.merge(merged, layer)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{key}: {e.msg if hasattr(e, 'msg') else e}".splitlines()[0]) from None
    validate(cfg)
    return cfg  # type: ignore[return-value]


_KEY_REFERENCE = re.compile(r"\$\{[A-Za-z_][\w.]*\}")  # ${model.lm.dim}: another key's value, nothing else


def _refuse_resolvers(value: Any, key: str, where: str = "") -> None:
    """Refuse `${oc.env:VAR}`, `${oc.decode:...}` and any custom resolver anywhere in `value`.

    OmegaConf resolves them when the config is built, so a shared preset or checkpoint could copy an
    environment secret into config.yaml of the run and of every checkpoint. Only plain references to
    other keys are kept."""
    if isinstance(value, dict):
        for k, v in value.items():
            _refuse_resolvers(v, f"{key}.{k}" if key else str(k), where)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _refuse_resolvers(v, f"{key}[{i}]", where)
    elif isinstance(value, str) and "${" in _KEY_REFERENCE.sub("", value):
        at = f" (in {where})" if where else ""
        raise ConfigError(
            f"{key}={value!r}{at}: resolver interpolations such as ${{oc.env:...}} are off in mm1 "
            "configs (they would copy environment variables or files into config.yaml and every "
            "checkpoint); write the value itself"
        )


RENAMED = {"data.world_size": "data.world_preset"}  # old key -> its new name


def _refuse_renamed(tree: Any, where: str) -> None:
    """A key that was renamed fails with its new name, instead of OmegaConf's 'not in DataConfig'."""
    for old, new in RENAMED.items():
        node = tree
        for part in old.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT:
            raise ConfigError(f"{old}={node!r} (in {where}): the key was renamed; write {new}={node} instead")


def migrate_renamed(tree: dict) -> dict:
    """A config written by an older mm1 (a checkpoint's config.yaml) with each renamed key moved to its
    new name: a run saved before a rename still loads and resumes. Hand-written configs keep the error."""
    tree = copy.deepcopy(tree)
    for old, new in RENAMED.items():
        *parents, leaf = old.split(".")
        node = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[new.split(".")[-1]] = node.pop(leaf)
    return tree


_ABSENT = object()


def _first_line(e: Exception) -> str:
    what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
    return what or " ".join(str(e).split("\n")[0].split())


# Package data (a link to the repo's configs/ in a checkout, real files in a wheel): found the same
# way in an editable install, a source checkout on PYTHONPATH and a plain `pip install .`.
PRESETS_DIR = Path(str(resources.files("mm1") / "configs"))


def preset_path(name: str | Path) -> Path:
    """A preset by file path, or by name from the installed presets (`tiny` -> configs/tiny.yaml)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    candidate = PRESETS_DIR / f"{name}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"preset {name!r}: no {candidate}; known presets: {', '.join(preset_names())}")
    return candidate


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def config_from_dict(data: dict[str, Any], where: str = "a saved config") -> Config:
    """Rebuild a validated Config from `to_dict` output (e.g. a checkpoint's config.yaml)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    train = data.get("train")
    if isinstance(train, dict) and "tensorboard" in train:  # saved before train.loggers replaced the flag
        train = {k: v for k, v in train.items() if k != "tensorboard"}
        train.setdefault("loggers", ["jsonl", "tensorboard"] if data["train"]["tensorboard"] else ["jsonl"])
        data = {**data, "train": train}
    return _build([(where, data)])


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ----------------------------------------------------------------------------- validation


def _at_least(key: str, value: float, low: float) -> None:
    _check(math.isfinite(value) and value >= low, key, value, f"must be >= {low} (allowed: [{low}, inf))")


def _within(key: str, value: float, low: float, high: float, high_open: bool = False) -> None:
    ok = math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
    _check(ok, key, value, f"must be in [{low}, {high}{')' if high_open else ']'}")


IMAGE_FORMATS = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]  # raster decoders only: never EPS/PS/PDF


def _check_ranges(cfg: Config) -> None:
    """Every numeric key with a valid range, checked at load time (a batch size of 0 used to train on nothing)."""
    v, c, lm, d, t, e = cfg.model.vision, cfg.model.connector, cfg.model.lm, cfg.data, cfg.train, cfg.eval
    for key, value in [
        ("model.vision.image_size", v.image_size),
        ("model.vision.patch_size", v.patch_size),
        ("model.vision.width", v.width),
        ("model.vision.depth", v.depth),
        ("model.vision.heads", v.heads),
        ("model.vision.mlp_dim", v.mlp_dim),
        ("model.connector.mlp_depth", c.mlp_depth),
        ("model.connector.heads", c.heads),
        ("model.lm.vocab_size", lm.vocab_size),
        ("model.lm.dim", lm.dim),
        ("model.lm.n_layers", lm.n_layers),
        ("model.lm.n_heads", lm.n_heads),
        ("model.lm.ffn_dim", lm.ffn_dim),
        ("model.lm.max_seq_len", lm.max_seq_len),
        ("data.seq_len", d.seq_len),
        ("data.max_images", d.max_images),
        ("data.batch_size", d.batch_size),
        ("data.max_member_bytes", d.max_member_bytes),
        ("train.grad_accum", t.grad_accum),
        ("train.save_every", t.save_every),
        ("train.log_every", t.log_every),
        ("eval.trials", e.trials),
        ("eval.batch_size", e.batch_size),
        ("eval.max_new_tokens", e.max_new_tokens),
    ]:
        _at_least(key, value, 1)
    for key, value in [
        ("model.connector.depth", c.depth),
        ("model.connector.hidden_dim", c.hidden_dim),
        ("model.lm.n_kv_heads", lm.n_kv_heads),
        ("model.lm.n_experts", lm.n_experts),
        ("model.lm.moe_lb_coef", lm.moe_lb_coef),
        ("model.lm.moe_z_coef", lm.moe_z_coef),
        ("data.num_workers", d.num_workers),
        ("data.image_cache_mb", d.image_cache_mb),
        ("train.warmup_steps", t.warmup_steps),
        ("train.clip", t.clip),
        ("train.keep_last", t.keep_last),
        ("train.data_shards", t.data_shards),
        ("train.eval_every", t.eval_every),
        ("eval.limit", e.limit),
    ]:
        _at_least(key, value, 0)
    for key, value in [
        ("model.vision.norm_eps", v.norm_eps),
        ("model.vision.pos_init_std", v.pos_init_std),
        ("model.lm.norm_eps", lm.norm_eps),
        ("model.lm.rope_theta", lm.rope_theta),
    ]:
        _check(math.isfinite(value) and value > 0, key, value, "must be > 0 (allowed: (0, inf))")
    _check(len(t.betas) == 2, "train.betas", t.betas, "needs two values (beta1, beta2)")
    for i, b in enumerate(t.betas):
        _within(f"train.betas[{i}]", b, 0.0, 1.0, high_open=True)
    if t.weight_decay is not None:
        _at_least("train.weight_decay", t.weight_decay, 0)
    for name, src in d.sources.items():
        _at_least(f"data.sources.{name}.weight", src.weight, 0)
    _check(
        bool(d.image_formats) and all(f in IMAGE_FORMATS for f in d.image_formats),
        "data.image_formats",
        d.image_formats,
        f"must be a non-empty list of {', '.join(IMAGE_FORMATS)} (never EPS/PS/PDF: "
        "Pillow hands those to Ghostscript, which runs PostScript)",
    )


def validate(cfg: Config) -> None:
    """Semantic checks that types alone cannot express; raise ConfigError on the first failure.

    The rules of a component chosen by name (encoder, connector, LM, eval tasks) live with it and
    are run by `check_config` (`mm1.registry`); this file checks what no single component owns."""
    lm = cfg.model.lm
    _check_ranges(cfg)  # first: the checks below divide by these
    check_config(cfg)
    _check(
        0 <= cfg.model.image_token_id < lm.vocab_size,
        "model.image_token_id",
        cfg.model.image_token_id,
        f"must be a token id below model.lm.vocab_size={lm.vocab_size}",
    )
    _check(cfg.model.subimage_grid >= 0, "model.subimage_grid", cfg.model.subimage_grid, "must be >= 0")

    d = cfg.data
    _one_of("data.resize", d.resize, ["crop", "pad"])
    _one_of("data.world_preset", d.world_preset, ["tiny", "small", "base", "single"])
    _check(
        d.seq_len > cfg.model.tokens_per_image,
        "data.seq_len",
        d.seq_len,
        f"must exceed the {cfg.model.tokens_per_image} slot tokens of one image",
    )
    _check(d.seq_len <= lm.max_seq_len, "data.seq_len", d.seq_len, f"must be <= model.lm.max_seq_len={lm.max_seq_len}")
    for name, src in d.sources.items():
        _one_of(f"data.sources.{name}.kind", src.kind, KINDS.names())
        _check(src.weight >= 0, f"data.sources.{name}.weight", src.weight, "must be >= 0")
    if d.sources:
        _check(
            sum(s.weight for s in d.sources.values()) > 0,
            "data.sources",
            "all weights 0",
            "at least one source needs a positive weight",
        )
    _one_of("data.caption_text", d.caption_text, list(CAPTION_TEXTS))
    _check(
        0.0 <= d.synthetic_caption_ratio <= 1.0,
        "data.synthetic_caption_ratio",
        d.synthetic_caption_ratio,
        "must be in [0, 1]",
    )
    _check(0.0 <= d.max_skip_rate <= 1.0, "data.max_skip_rate", d.max_skip_rate, "must be in [0, 1]")
    _check(d.shuffle_block >= 1, "data.shuffle_block", d.shuffle_block, "must be >= 1 (1 = each file in its order)")

    t = cfg.train
    _one_of("train.strategy", t.strategy, ["auto", "single", "ddp", "fsdp"])
    _one_of("train.superclass_pool", t.superclass_pool, list(SUPERCLASS_POOLS))
    _check(
        t.superclass_group_weight >= 0 and math.isfinite(t.superclass_group_weight),
        "train.superclass_group_weight",
        t.superclass_group_weight,
        "must be a finite number >= 0",
    )
    _one_of("train.precision", t.precision, ["auto", "fp32", "bf16"])
    _one_of("train.nonfinite", t.nonfinite, ["stop", "skip"])
    _check(t.steps > 0, "train.steps", t.steps, "must be positive")
    _check(
        t.lr is None or (math.isfinite(t.lr) and t.lr > 0),
        "train.lr",
        t.lr,
        "must be > 0 (allowed: (0, inf)), or unset for the MM1 law",
    )
    for part in ("vision", "connector", "lm"):
        _check(
            getattr(t.lr_mult, part) > 0,
            f"train.lr_mult.{part}",
            getattr(t.lr_mult, part),
            "must be positive (freeze a part with train.freeze_<part> instead)",
        )
    _check(t.lr_scale > 0, "train.lr_scale", t.lr_scale, "must be positive (1.0 = the law)")
    _check(t.sft_lr_scale > 0, "train.sft_lr_scale", t.sft_lr_scale, "must be positive (1.0 = the pre-training law)")
    _check(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
    _one_of("train.schedule", t.schedule, ["cosine", "wsd"])
    _check(0.0 < t.decay_fraction <= 1.0, "train.decay_fraction", t.decay_fraction, "must be in (0, 1]")
    _check(
        math.isfinite(t.time_budget_s) and t.time_budget_s >= 0,
        "train.time_budget_s",
        t.time_budget_s,
        "must be >= 0 seconds (0 = no budget: train.steps steps)",
    )
    _check(
        t.time_budget_s == 0 or t.schedule == "wsd",
        "train.time_budget_s",
        t.time_budget_s,
        f"needs train.schedule=wsd (got {t.schedule!r}): a cosine's shape is fixed by train.steps, a WSD "
        "decay can start when the clock says",
    )
    _check(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "must be >= 1")
    _check(t.save_every >= 1, "train.save_every", t.save_every, "must be >= 1")
