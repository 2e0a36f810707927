"""Launch configs (``configs/*.yaml``): their schema, validation, and the Megatron-LM flags they stand for.

A config has sections. In ``model``, ``moe``, ``parallel``, ``training`` and ``data`` every key is a
Megatron-LM flag with underscores (``moe_router_topk`` is ``--moe-router-topk``; a ``switch`` key set
to true is the bare flag, false omits it); ``microep`` holds the ``MicroEPConfig`` fields
(``redundant_slots`` is ``--microep-redundant-slots``). ``embedded`` (the ``microep train`` CPU run)
and ``launch`` (cluster shape for validation and the Slurm scripts) are not Megatron flags.
``megatron_flags`` turns a config into the command line; the embedded run reads the same values, so
a YAML file and its flags cannot drift apart.

The flags were checked against the argument parsers of Megatron-LM core_v0.16.1, core_v0.17.1,
core_v0.18.2 and core_r0.19.0 (docs/launch.md). Errors name the file, the ``section.key`` and the
problem; unknown keys are errors (with the closest known key), never ignored.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from megatron_microep.glue.config import DISPATCHER_TYPE, MicroEPConfig
from megatron_microep.settings import flag_of, settings, value_type


class ConfigError(ValueError):
    """A launch config that cannot be used; the message names the file and the ``section.key``."""


# Where the embedded CPU run puts a value: a TransformerConfig field, a GPTModel argument, its own
# loop, nowhere (Megatron-LM only: setting it in a config given to ``microep train`` is an error), or
# Megatron-LM's data pipeline (the embedded run trains on its own corpus and says so in its log).
TRANSFORMER, GPT, RUN, MEGATRON_LM_ONLY, MEGATRON_DATA = "transformer", "gpt", "run", None, "data"


@dataclass(frozen=True)
class Option:
    key: str
    kind: str  # a key of KINDS
    help: str
    embedded: str | None = MEGATRON_LM_ONLY
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    flag: str | None = None  # default: --key-with-dashes
    required: bool = False
    default: Any = None  # what a run uses when the config omits the key (None: Megatron's own default)

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.key.replace("_", "-")


# --- value kinds: parse (YAML value -> checked value) and render (value -> flag arguments) --------


def _int(value, option):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("expected an integer")
    return value


def _float(value, option):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("expected a number")
    return float(value)


def _str(value, option):
    if not isinstance(value, str) or not value:
        raise TypeError("expected a non-empty string")
    return value


def _switch(value, option):
    if not isinstance(value, bool):
        raise TypeError("expected true or false")
    return value


def _choice(value, option):
    if value not in option.choices:
        raise TypeError(f"expected one of {', '.join(option.choices)}")
    return value


def _str_list(value, option):
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
        raise TypeError("expected a string or a list of strings")
    return list(items)


def _layer_freq(value, option):
    if isinstance(value, list):
        if not value or any(isinstance(v, bool) or v not in (0, 1) for v in value):
            raise TypeError("expected an integer or a list of 0 (dense) and 1 (MoE) per layer")
        return list(value)
    return _int(value, option)


def _render_layer_freq(value) -> str:
    """``[0, 0, 1, 1, 1]`` -> ``([0]*2+[1]*3)``, the pattern syntax Megatron's --moe-layer-freq evaluates."""
    if not isinstance(value, list):
        return str(value)
    runs: list[list[int]] = []
    for v in value:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return "(" + "+".join(f"[{v}]*{n}" for v, n in runs) + ")"


def _number(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Kind:
    parse: Callable[[Any, Option], Any]
    render: Callable[[Option, Any], list[str]]
    numeric: bool = False


KINDS: dict[str, Kind] = {
    "int": Kind(_int, lambda o, v: [o.cli_flag, str(v)], numeric=True),
    "float": Kind(_float, lambda o, v: [o.cli_flag, _number(v)], numeric=True),
    "str": Kind(_str, lambda o, v: [o.cli_flag, v]),
    "choice": Kind(_choice, lambda o, v: [o.cli_flag, v]),
    "switch": Kind(_switch, lambda o, v: [o.cli_flag] if v else []),
    "str_list": Kind(_str_list, lambda o, v: [o.cli_flag, *v]),
    "layer_freq": Kind(_layer_freq, lambda o, v: [o.cli_flag, _render_layer_freq(v)]),
}


def _o(key, kind, help, embedded=MEGATRON_LM_ONLY, **kw) -> Option:
    return Option(key, kind, help, embedded, **kw)


MODEL = (
    _o("num_layers", "int", "transformer layers", TRANSFORMER, minimum=1, required=True),
    _o("hidden_size", "int", "model width", TRANSFORMER, minimum=1, required=True),
    _o("ffn_hidden_size", "int", "dense MLP width", TRANSFORMER, minimum=1),
    _o("num_attention_heads", "int", "attention heads", TRANSFORMER, minimum=1, required=True),
    _o("group_query_attention", "switch", "grouped-query attention (with num_query_groups)", RUN),
    _o("num_query_groups", "int", "key/value head groups", TRANSFORMER, minimum=1),
    _o("kv_channels", "int", "per-head dimension (default hidden_size / heads)", TRANSFORMER, minimum=1),
    _o("seq_length", "int", "training sequence length", GPT, minimum=1, required=True),
    _o("max_position_embeddings", "int", "position table size", GPT, minimum=1),
    _o("position_embedding_type", "choice", "position encoding", GPT, choices=("learned_absolute", "rope", "none")),
    _o("rotary_base", "int", "RoPE base", GPT, minimum=1),
    _o("rotary_percent", "float", "fraction of head dims rotated", GPT, minimum=0.0),
    _o("normalization", "choice", "norm layer", TRANSFORMER, choices=("LayerNorm", "RMSNorm")),
    _o("norm_epsilon", "float", "norm epsilon", TRANSFORMER, minimum=0.0),
    _o("swiglu", "switch", "SwiGLU MLPs", TRANSFORMER),
    _o("disable_bias_linear", "switch", "no biases in linear layers", TRANSFORMER),
    _o("untie_embeddings_and_output_weights", "switch", "separate output layer weights", GPT),
    _o("qk_layernorm", "switch", "normalise queries and keys", TRANSFORMER),
    _o("multi_latent_attention", "switch", "DeepSeek multi-latent attention"),
    _o("q_lora_rank", "int", "MLA query low-rank dimension", minimum=1),
    _o("kv_lora_rank", "int", "MLA key/value low-rank dimension", minimum=1),
    _o("qk_head_dim", "int", "MLA query/key head dimension", minimum=1),
    _o("qk_pos_emb_head_dim", "int", "MLA rotary head dimension", minimum=1),
    _o("v_head_dim", "int", "MLA value head dimension", minimum=1),
    _o("attention_dropout", "float", "attention dropout", TRANSFORMER, minimum=0.0),
    _o("hidden_dropout", "float", "hidden dropout", TRANSFORMER, minimum=0.0),
    _o("init_method_std", "float", "weight init standard deviation", TRANSFORMER, minimum=0.0),
    _o("make_vocab_size_divisible_by", "int", "vocabulary padding multiple", GPT, minimum=1),
    _o("transformer_impl", "choice", "layer implementation", TRANSFORMER, choices=("local", "transformer_engine")),
)

MOE = (
    _o("num_experts", "int", "routed experts per MoE layer", TRANSFORMER, minimum=1, required=True),
    _o("moe_ffn_hidden_size", "int", "expert MLP width", TRANSFORMER, minimum=1),
    _o("moe_router_topk", "int", "experts per token", TRANSFORMER, minimum=1),
    _o("moe_layer_freq", "layer_freq", "1:N MoE/dense ratio, or a 0/1 per layer", TRANSFORMER),
    _o("moe_shared_expert_intermediate_size", "int", "shared-expert width", TRANSFORMER, minimum=1),
    _o(
        "moe_router_load_balancing_type",
        "choice",
        "auxiliary balancing loss",
        TRANSFORMER,
        choices=("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"),
    ),
    _o("moe_aux_loss_coeff", "float", "auxiliary loss weight", TRANSFORMER, minimum=0.0),
    _o("moe_z_loss_coeff", "float", "router z-loss weight", TRANSFORMER, minimum=0.0),
    _o("moe_router_score_function", "choice", "router scores", TRANSFORMER, choices=("softmax", "sigmoid")),
    _o("moe_router_pre_softmax", "switch", "softmax before top-k", TRANSFORMER),
    _o("moe_router_topk_scaling_factor", "float", "scale of the top-k probabilities", TRANSFORMER, minimum=0.0),
    _o("moe_router_enable_expert_bias", "switch", "aux-loss-free expert bias (DeepSeek-V3)", TRANSFORMER),
    _o("moe_router_bias_update_rate", "float", "expert bias update rate", TRANSFORMER, minimum=0.0),
    _o("moe_router_num_groups", "int", "node-limited routing: expert groups", TRANSFORMER, minimum=1),
    _o("moe_router_group_topk", "int", "node-limited routing: groups per token", TRANSFORMER, minimum=1),
    _o("moe_router_dtype", "choice", "router precision", TRANSFORMER, choices=("fp32", "fp64")),
    _o(
        "moe_token_dispatcher_type",
        "choice",
        "token dispatcher (microep: this plugin)",
        TRANSFORMER,
        choices=("allgather", "alltoall", "flex", DISPATCHER_TYPE),
        required=True,
    ),
    _o("moe_grouped_gemm", "switch", "grouped-GEMM experts (TransformerEngine)", TRANSFORMER),
    _o("moe_permute_fusion", "switch", "fused permutation kernels (TransformerEngine)"),
)

PARALLEL = (
    _o("tensor_model_parallel_size", "int", "TP", RUN, minimum=1),
    _o("pipeline_model_parallel_size", "int", "PP", RUN, minimum=1),
    _o("expert_model_parallel_size", "int", "EP", TRANSFORMER, minimum=1, required=True),
    _o("expert_tensor_parallel_size", "int", "expert TP", TRANSFORMER, minimum=1),
    _o("context_parallel_size", "int", "CP", RUN, minimum=1),
    _o("sequence_parallel", "switch", "sequence parallelism (with TP > 1)", TRANSFORMER),
    _o("use_distributed_optimizer", "switch", "ZeRO-1 distributed optimizer"),
    _o("decoder_first_pipeline_num_layers", "int", "layers on the first pipeline stage", minimum=1),
    _o("decoder_last_pipeline_num_layers", "int", "layers on the last pipeline stage", minimum=1),
    _o("overlap_grad_reduce", "switch", "overlap the gradient reduction with backward"),
    _o("overlap_param_gather", "switch", "overlap the parameter all-gather with forward"),
)

TRAINING = (
    _o("micro_batch_size", "int", "sequences per micro-batch per data-parallel rank", RUN, minimum=1, required=True),
    _o("global_batch_size", "int", "sequences per optimizer step", RUN, minimum=1, required=True),
    _o("train_iters", "int", "optimizer steps", RUN, minimum=1, required=True),
    _o("lr", "float", "peak learning rate", RUN, minimum=0.0, required=True),
    _o("min_lr", "float", "final learning rate", RUN, minimum=0.0),
    _o("lr_warmup_iters", "int", "linear warm-up steps", RUN, minimum=0),
    _o("lr_decay_style", "choice", "decay schedule", RUN, choices=("constant", "linear", "cosine")),
    _o("lr_decay_iters", "int", "decay length (default train_iters)", RUN, minimum=1),
    _o("weight_decay", "float", "AdamW weight decay", RUN, minimum=0.0),
    _o("adam_beta1", "float", "Adam beta1", RUN, minimum=0.0),
    _o("adam_beta2", "float", "Adam beta2", RUN, minimum=0.0),
    _o("adam_eps", "float", "Adam epsilon", RUN, minimum=0.0),
    _o("clip_grad", "float", "gradient-norm clip", RUN, minimum=0.0),
    _o("seed", "int", "random seed", RUN, minimum=0, default=1234),  # Megatron-LM's --seed default
    _o("bf16", "switch", "bf16 mixed precision"),
    _o("log_interval", "int", "steps between log lines", RUN, minimum=1),
    _o("save_interval", "int", "steps between checkpoints", RUN, minimum=1),
    _o("eval_interval", "int", "steps between validation passes", RUN, minimum=1),
    _o("eval_iters", "int", "validation micro-batches per pass", RUN, minimum=1),
    _o("save", "str", "checkpoint directory"),
    _o("load", "str", "checkpoint to resume from"),
    _o("recompute_granularity", "choice", "activation recomputation", choices=("full", "selective")),
    _o("recompute_method", "choice", "full recompute method", choices=("uniform", "block")),
    _o("recompute_num_layers", "int", "layers per recompute unit", minimum=1),
    _o("exit_signal_handler", "switch", "save and exit on SIGTERM (Slurm preemption)"),
)

DATA = (
    _o("data_path", "str_list", "Megatron indexed dataset prefix(es), optionally weighted", MEGATRON_DATA),
    _o("mock_data", "switch", "Megatron's synthetic data", MEGATRON_DATA),
    _o("split", "str", "train/valid/test split, e.g. 949,50,1", MEGATRON_DATA),
    _o("tokenizer_type", "str", "Megatron tokenizer type", MEGATRON_DATA),
    _o("tokenizer_model", "str", "tokenizer model file or Hugging Face name", MEGATRON_DATA),
    _o("vocab_file", "str", "tokenizer vocabulary file", MEGATRON_DATA),
    _o("merge_file", "str", "BPE merges file", MEGATRON_DATA),
    _o("vocab_size", "int", "vocabulary size (NullTokenizer)", MEGATRON_DATA, minimum=1),
)

EMBEDDED = (
    _o("processes", "int", "CPU ranks (gloo); EP must divide it", RUN, minimum=1, default=4),
    _o("threads_per_rank", "int", "torch intra-op threads per rank", RUN, minimum=1, default=1),
    _o("corpus_megabytes", "float", "Python standard-library source to train on, in MB", RUN, minimum=0.1, default=3.0),
    _o(
        "tokenizer_vocab_size", "int", "byte-level BPE vocabulary trained on the corpus", RUN, minimum=260, default=4096
    ),
    _o("validation_fraction", "float", "share of corpus files held out for validation", RUN, minimum=0.0, default=0.05),
    _o("report_policies", "str_list", "policies the balance report compares (all: every policy)", RUN, default=["all"]),
    _o("timeout_minutes", "float", "abort the run if it has not finished by then", RUN, minimum=0.1, default=60.0),
)

LAUNCH = (
    _o("nodes", "int", "nodes of a cluster job", minimum=1),
    _o("gpus_per_node", "int", "GPUs (ranks) per node", minimum=1),
)


def _microep_options() -> tuple[Option, ...]:
    """One option per MicroEP setting (``megatron_microep.settings``): key ``<field>``, flag ``--microep-<field>``.

    The kind and choices come from the setting; its ranges are checked by ``MicroEPConfig.validate``.
    """
    options = []
    for f, spec in settings():
        choices = spec.all_choices()
        kind = "choice" if choices else value_type(f).__name__
        options.append(Option(f.name, kind, spec.help, RUN, choices=choices, flag=flag_of(f.name)))
    return tuple(options)


SECTIONS: dict[str, tuple[Option, ...]] = {
    "model": MODEL,
    "moe": MOE,
    "parallel": PARALLEL,
    "training": TRAINING,
    "data": DATA,
    "microep": _microep_options(),
    "embedded": EMBEDDED,
    "launch": LAUNCH,
}
FLAG_SECTIONS = ("model", "moe", "parallel", "training", "data", "microep")
TOP_LEVEL = {"name", "description"}


@dataclass
class LaunchConfig:
    """A validated config: ``sections[section][key]`` holds only the keys the file (or --set) gave."""

    name: str
    description: str
    source: str
    sections: dict[str, dict[str, Any]]

    def get(self, section: str, key: str, default: Any = None) -> Any:
        return self.sections.get(section, {}).get(key, default)

    def value(self, section: str, key: str) -> Any:
        """The config's value, else the option's declared default (``Option.default``)."""
        if key in self.sections.get(section, {}):
            return self.sections[section][key]
        return next(o.default for o in SECTIONS[section] if o.key == key)

    @property
    def dispatcher(self) -> str:
        return self.sections["moe"]["moe_token_dispatcher_type"]

    def microep_settings(self) -> MicroEPConfig | None:
        """The run's MicroEP settings (None unless it selects the MicroEP dispatcher)."""
        if self.dispatcher != DISPATCHER_TYPE:
            return None
        return self.microep_section()

    def microep_section(self) -> MicroEPConfig:
        """The ``microep`` section with the settings' defaults (the model-dependent ones resolved for
        this model), whichever dispatcher the run selects."""
        section = MicroEPConfig(**self.sections.get("microep", {}))
        num_experts = self.get("moe", "num_experts")
        return (
            section.for_model(num_experts, self.value("parallel", "expert_model_parallel_size"))
            if num_experts
            else section
        )

    def megatron_flags(self) -> list[str]:
        """Megatron-LM command-line arguments for this config (``microep`` flags only with its dispatcher)."""
        out: list[str] = []
        for section in FLAG_SECTIONS:
            if section == "microep" and self.dispatcher != DISPATCHER_TYPE:
                continue
            values = self.sections.get(section, {})
            for option in SECTIONS[section]:
                if option.key in values:
                    out += KINDS[option.kind].render(option, values[option.key])
        return out

    def flat(self) -> SimpleNamespace:
        """Every flag-section value under its key (``microep`` ones as ``microep_<field>``)."""
        merged = {}
        for section in FLAG_SECTIONS:
            prefix = "microep_" if section == "microep" else ""
            merged.update({prefix + k: v for k, v in self.sections.get(section, {}).items()})
        return SimpleNamespace(**merged)


def _closest(key: str, known: Sequence[str]) -> str:
    match = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _parse_override(text: str) -> tuple[str, str, Any]:
    path, sep, raw = text.partition("=")
    section, dot, key = path.partition(".")
    if not sep or not dot or not key:
        raise ConfigError(f"--set {text!r}: expected SECTION.KEY=VALUE")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML") from None
    return section.strip(), key.strip(), value


def parse_config(raw: Any, source: str, overrides: Sequence[str] = ()) -> LaunchConfig:
    """Validate a loaded YAML document (plus ``SECTION.KEY=VALUE`` overrides); raises ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for text in overrides:
        section, key, value = _parse_override(text)
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"--set {text!r}: '{section}' is not a section")
        if value is None:
            target.pop(key, None)  # "KEY=" removes a key (back to Megatron's default)
        else:
            target[key] = value
    sections: dict[str, dict[str, Any]] = {}
    for name, body in raw.items():
        if name in TOP_LEVEL:
            if not isinstance(body, str):
                raise ConfigError(f"{source}: '{name}' must be a string")
            continue
        if name not in SECTIONS:
            raise ConfigError(
                f"{source}: unknown section '{name}'{_closest(name, list(SECTIONS) + sorted(TOP_LEVEL))}"
                f"; sections are {', '.join(SECTIONS)}"
            )
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: section '{name}' must be a mapping of keys to values")
        options = {o.key: o for o in SECTIONS[name]}
        values = {}
        for key, value in body.items():
            option = options.get(key)
            if option is None:
                raise ConfigError(f"{source}: unknown key '{name}.{key}'{_closest(str(key), options)}")
            try:
                value = KINDS[option.kind].parse(value, option)
            except TypeError as err:
                raise ConfigError(f"{source}: {name}.{key}: {err}, got {value!r}") from None
            if option.minimum is not None and KINDS[option.kind].numeric and value < option.minimum:
                raise ConfigError(f"{source}: {name}.{key}: must be >= {_number(option.minimum)}, got {value!r}")
            values[key] = value
        sections[name] = values
    for name, options in SECTIONS.items():
        for option in options:
            if option.required and option.key not in sections.get(name, {}):
                raise ConfigError(f"{source}: missing required key '{name}.{option.key}'")
    config = LaunchConfig(raw.get("name", Path(source).stem), raw.get("description", ""), source, sections)
    for check in CHECKS:
        check(config)
    return config


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> LaunchConfig:
    """Read and validate a YAML config file; raises ConfigError (also for unreadable or invalid YAML)."""
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    return parse_config(raw, path, overrides)


def preset_path(name_or_path: str) -> Path:
    """A path as given, or ``configs/<name>.yaml`` of this checkout for a bare preset name."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return Path(__file__).resolve().parents[2] / "configs" / f"{name_or_path}.yaml"


# --- cross-field checks (each raises ConfigError naming the keys involved) ------------------------


def _fail(config: LaunchConfig, message: str):
    raise ConfigError(f"{config.source}: {message}")


def _check_model_shape(config: LaunchConfig) -> None:
    heads = config.get("model", "num_attention_heads")
    hidden = config.get("model", "hidden_size")
    if config.get("model", "kv_channels") is None and hidden % heads:
        _fail(
            config,
            f"model.hidden_size {hidden} is not divisible by model.num_attention_heads {heads} "
            "(set model.kv_channels for another head size)",
        )
    groups = config.get("model", "num_query_groups")
    if groups is not None:
        if not config.get("model", "group_query_attention", False):
            _fail(config, "model.num_query_groups needs model.group_query_attention: true")
        if heads % groups:
            _fail(config, f"model.num_attention_heads {heads} is not divisible by model.num_query_groups {groups}")
    seq, table = config.get("model", "seq_length"), config.get("model", "max_position_embeddings")
    if table is not None and seq > table:
        _fail(config, f"model.seq_length {seq} exceeds model.max_position_embeddings {table}")
    freq = config.get("moe", "moe_layer_freq")
    layers = config.get("model", "num_layers")
    if isinstance(freq, list) and len(freq) != layers:
        _fail(config, f"moe.moe_layer_freq lists {len(freq)} layers, model.num_layers is {layers}")
    if config.get("model", "multi_latent_attention", False):
        for key in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
            if config.get("model", key) is None:
                _fail(config, f"model.multi_latent_attention needs model.{key}")


def _check_moe(config: LaunchConfig) -> None:
    experts, topk = config.get("moe", "num_experts"), config.get("moe", "moe_router_topk", 2)
    if topk > experts:
        _fail(config, f"moe.moe_router_topk {topk} exceeds moe.num_experts {experts}")
    groups, group_topk = config.get("moe", "moe_router_num_groups"), config.get("moe", "moe_router_group_topk")
    if (groups is None) != (group_topk is None):
        _fail(config, "moe.moe_router_num_groups and moe.moe_router_group_topk go together")
    if groups is not None and (experts % groups or group_topk > groups):
        _fail(
            config,
            f"moe.moe_router_num_groups {groups} must divide moe.num_experts {experts} "
            f"and be >= moe.moe_router_group_topk {group_topk}",
        )
    ep = config.get("parallel", "expert_model_parallel_size")
    if experts % ep:
        _fail(config, f"moe.num_experts {experts} is not divisible by parallel.expert_model_parallel_size {ep}")


def _world_size(config: LaunchConfig) -> tuple[int, str] | None:
    if "embedded" in config.sections and "processes" in config.sections["embedded"]:
        return config.get("embedded", "processes"), "embedded.processes"
    nodes, per_node = config.get("launch", "nodes"), config.get("launch", "gpus_per_node")
    if nodes is not None and per_node is not None:
        return nodes * per_node, "launch.nodes x launch.gpus_per_node"
    return None


def _check_parallel(config: LaunchConfig) -> None:
    world = _world_size(config)
    if world is None:
        return
    size, what = world
    tp = config.get("parallel", "tensor_model_parallel_size", 1)
    pp = config.get("parallel", "pipeline_model_parallel_size", 1)
    cp = config.get("parallel", "context_parallel_size", 1)
    ep = config.get("parallel", "expert_model_parallel_size")
    etp = config.get("parallel", "expert_tensor_parallel_size", tp)
    if size % (tp * pp * cp):
        _fail(config, f"{what} = {size} is not divisible by TP x PP x CP = {tp} x {pp} x {cp}")
    if size % (etp * ep * pp):
        _fail(config, f"{what} = {size} is not divisible by expert TP x EP x PP = {etp} x {ep} x {pp}")
    dp = size // (tp * pp * cp)
    micro, global_ = config.get("training", "micro_batch_size"), config.get("training", "global_batch_size")
    if global_ % (micro * dp):
        _fail(
            config,
            f"training.global_batch_size {global_} is not divisible by training.micro_batch_size "
            f"{micro} x data-parallel size {dp} ({what} {size} / (TP {tp} x PP {pp} x CP {cp}))",
        )


def _check_schedule(config: LaunchConfig) -> None:
    warmup = config.get("training", "lr_warmup_iters", 0)
    decay_key = "lr_decay_iters" if config.get("training", "lr_decay_iters") is not None else "train_iters"
    decay = config.get("training", decay_key)
    if warmup >= decay:
        _fail(config, f"training.lr_warmup_iters {warmup} must be smaller than training.{decay_key} {decay}")


def _check_microep(config: LaunchConfig) -> None:
    from megatron_microep.glue.config import MicroEPConfigError, check_megatron_compatibility

    settings = config.microep_settings()
    if settings is None:
        return
    try:
        check_megatron_compatibility(settings.validate(), config.flat())
    except MicroEPConfigError as err:
        _fail(config, f"microep: {err}")


def _check_data(config: LaunchConfig) -> None:
    if config.get("data", "data_path") is not None and config.get("data", "mock_data", False):
        _fail(config, "data.data_path and data.mock_data exclude each other")


CHECKS: tuple[Callable[[LaunchConfig], None], ...] = (
    _check_model_shape,
    _check_moe,
    _check_parallel,
    _check_schedule,
    _check_microep,
    _check_data,
)


def embedded_unsupported(config: LaunchConfig) -> list[str]:
    """``section.key`` of every set value the embedded CPU run cannot honour (Megatron-LM-only keys;
    a switch set to false counts as unset)."""
    out = []
    for section in FLAG_SECTIONS:
        options = {o.key: o for o in SECTIONS[section]}
        for key, value in config.sections.get(section, {}).items():
            if options[key].embedded is MEGATRON_LM_ONLY and value is not False:
                out.append(f"{section}.{key}")
    return out
