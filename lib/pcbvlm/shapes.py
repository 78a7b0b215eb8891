"""The architecture of the model, as numbers: the 32B-class shapes, and parameter counts per part.

The preflight memory estimate and the GPU benchmark both need the model's shape. The real config.json is
used where it is on disk (a local folder or the Hugging Face cache); when it is not (a fresh machine,
offline), each model family holds its 32B-class shape (`ModelFamily.config_dict_32b`, found for a hub id
by `builtin_32b_family`); `qwen3_vl_32b_config()` gives Qwen3-VL-32B-Instruct's without a download.
`count_parameters` does the arithmetic of both families' blocks (tests compare it with the meta-device
count of each family's 32B shape).

`ModelShape` is a plain description read from a `transformers.Qwen3VLConfig`, a config.json dict or
another `ModelShape`; `count_parameters(shape)` counts the parameters of each part by arithmetic
(`count_parameters_meta` instantiates the model on the meta device, to check the arithmetic). Importing
this module does not import torch or transformers; only `qwen3_vl_32b_config` and
`count_parameters_meta` do.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pcbvlm.families.base import ModelFamily
from pcbvlm.families.qwen3_vl import FAMILY as QWEN3_VL

QWEN3_VL_32B_ID = QWEN3_VL.hub_id_32b
# 33,357,390,064: what the meta-device instantiation of the shape above counts (tests check both).
QWEN3_VL_32B_PARAMS = 33_357_390_064


def builtin_32b_family(name_or_path: str) -> ModelFamily | None:
    """The family whose built-in 32B-class shape `name_or_path` names (a hub id such as
    Qwen/Qwen3-VL-32B-Instruct or Qwen/Qwen2.5-VL-32B-Instruct), or None."""
    from pcbvlm.families import FAMILIES

    name = name_or_path.strip().rstrip("/")
    return next((f for f in FAMILIES.values() if f.name_32b.search(name)), None)


def is_qwen3_vl_32b(name_or_path: str) -> bool:
    """True for the Qwen3-VL-32B hub ids (Instruct, Thinking) whose shape `qwen3_vl_32b_config` holds."""
    return builtin_32b_family(name_or_path) is QWEN3_VL


def qwen3_vl_32b_dict() -> dict[str, Any]:
    """The 32B architecture as a config.json-like dict (no transformers import)."""
    return QWEN3_VL.config_dict_32b()


def qwen3_vl_32b_config(**text_overrides: Any):
    """`transformers.Qwen3VLConfig` of Qwen3-VL-32B-Instruct; `text_overrides` change text-config keys
    (e.g. `num_hidden_layers=2` for a cut-down benchmark model of the same width)."""
    return QWEN3_VL.config_32b(**text_overrides)


@dataclass(frozen=True)
class VisionShape:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    out_hidden_size: int
    num_position_embeddings: int  # the learned position table (Qwen3-VL); 0 without one (Qwen2.5-VL)
    num_deepstack: int
    # Qwen2.5-VL's blocks: a gated MLP (gate, up, down), RMSNorms, and a patch embedding without bias;
    # Qwen3-VL's: a 2-layer MLP, LayerNorms (weight and bias), a patch embedding with bias.
    gated_mlp: bool = False
    rms_norm: bool = False

    @property
    def merged_size(self) -> int:
        """Width of the vision->text merger's input: 2x2 neighbouring patches concatenated."""
        return self.hidden_size * self.spatial_merge_size**2


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Qwen-VL (or text-only Qwen) architecture that memory and size depend on."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q, k, v and o (Qwen3's attention_bias)
    qkv_bias: bool = False  # biases on q, k and v only (Qwen2/Qwen2.5)
    qk_norm: bool = True  # RMSNorms on queries and keys per head (Qwen3; not Qwen2.5)
    vision: VisionShape | None = field(default=None)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def decoder_linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear in one language-model decoder layer, by module name."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def merger_linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of the vision->text merger's linears (`model.visual.merger.linear_fc1/2`)."""
        if self.vision is None:
            return {}
        m = self.vision.merged_size
        return {"linear_fc1": (m, m), "linear_fc2": (m, self.vision.out_hidden_size)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a ModelShape, a `transformers` config object or a config.json dict (transformers 4 or 5
        spelling; a composite Qwen-VL config or a text-only one). A vision config with
        `fullatt_block_indexes` is Qwen2.5-VL's windowed tower (and its text model Qwen2.5's: q/k/v biases,
        no q/k norms)."""
        if isinstance(config, ModelShape):
            return config
        if not isinstance(config, Mapping):
            to_dict = getattr(config, "to_dict", None)
            if to_dict is None:
                raise TypeError(f"cannot read a model shape from {type(config).__name__}")
            config = to_dict()
        text = config.get("text_config") or config
        vision_cfg = config.get("vision_config")
        qwen2_5 = bool(vision_cfg) and "fullatt_block_indexes" in vision_cfg
        try:
            hidden = int(text["hidden_size"])
            heads = int(text["num_attention_heads"])
            vision = None
            if vision_cfg:
                vision = VisionShape(
                    depth=int(vision_cfg["depth"]),
                    hidden_size=int(vision_cfg["hidden_size"]),
                    intermediate_size=int(vision_cfg["intermediate_size"]),
                    num_heads=int(vision_cfg.get("num_heads", vision_cfg.get("num_attention_heads", 16))),
                    in_channels=int(vision_cfg.get("in_channels", 3)),
                    patch_size=int(vision_cfg.get("patch_size", 16)),
                    spatial_merge_size=int(vision_cfg.get("spatial_merge_size", 2)),
                    temporal_patch_size=int(vision_cfg.get("temporal_patch_size", 2)),
                    out_hidden_size=int(vision_cfg.get("out_hidden_size", hidden)),
                    num_position_embeddings=int(
                        vision_cfg.get("num_position_embeddings", 0 if qwen2_5 else 2304)
                    ),
                    num_deepstack=len(vision_cfg.get("deepstack_visual_indexes") or ()),
                    gated_mlp=qwen2_5,
                    rms_norm=qwen2_5,
                )
            tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
            return cls(
                vocab_size=int(text["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(text["intermediate_size"]),
                num_layers=int(text["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(text.get("num_key_value_heads") or heads),
                head_dim=int(text.get("head_dim") or hidden // heads),
                tie_word_embeddings=bool(tie),
                attention_bias=bool(text.get("attention_bias", False)),
                qkv_bias=qwen2_5,
                qk_norm=not qwen2_5,
                vision=vision,
            )
        except KeyError as err:
            raise ValueError(f"model config has no {err.args[0]!r}: not a Qwen-VL config") from None


def qwen3_vl_32b_shape() -> ModelShape:
    return ModelShape.from_config(qwen3_vl_32b_dict())


@dataclass(frozen=True)
class ParamCounts:
    """Parameters per part, named after the module paths of `Qwen3VLForConditionalGeneration`."""

    lm_linears: int  # model.language_model.layers.*.{self_attn,mlp}.*_proj: what NF4 quantizes
    lm_norms: int  # the decoder's RMSNorms (input, post-attention, q_norm, k_norm, final norm)
    embed_tokens: int  # model.language_model.embed_tokens
    lm_head: int  # 0 when tied to the embeddings
    vision: int  # model.visual.* (patch embed, blocks, merger, deepstack mergers)

    @property
    def total(self) -> int:
        return self.lm_linears + self.lm_norms + self.embed_tokens + self.lm_head + self.vision

    @property
    def not_quantized(self) -> int:
        """What stays in bf16 under QLoRA and AWQ: everything but the decoder linears."""
        return self.total - self.lm_linears


def count_parameters(model: Any) -> ParamCounts:
    """Parameter counts per part by arithmetic (ModelShape, transformers config or config.json dict)."""
    s = ModelShape.from_config(model)
    per_layer = 0
    for name, (fan_in, fan_out) in s.decoder_linears().items():
        biased = (s.attention_bias and name in ("q_proj", "k_proj", "v_proj", "o_proj")) or (
            s.qkv_bias and name in ("q_proj", "k_proj", "v_proj")
        )
        per_layer += fan_in * fan_out + (fan_out if biased else 0)
    norms = s.num_layers * (2 * s.hidden_size + (2 * s.head_dim if s.qk_norm else 0)) + s.hidden_size
    embed = s.vocab_size * s.hidden_size
    vision = 0
    if s.vision is not None:
        v = s.vision
        h, i, m = v.hidden_size, v.intermediate_size, v.merged_size
        norm = h if v.rms_norm else 2 * h  # RMSNorm: a weight; LayerNorm: weight + bias
        patch_embed = v.in_channels * v.temporal_patch_size * v.patch_size**2 * h + (0 if v.rms_norm else h)
        pos_embed = v.num_position_embeddings * h
        mlp = (3 if v.gated_mlp else 2) * h * i + (2 * i if v.gated_mlp else i) + h  # all with bias
        # Block: two norms, qkv and proj with bias, the MLP.
        block = 2 * norm + (3 * h * h + 3 * h) + (h * h + h) + mlp
        merger_linears = (m * m + m) + (m * v.out_hidden_size + v.out_hidden_size)
        merger = norm + merger_linears  # a norm over one patch, before the 2x2 shuffle
        deepstack = v.num_deepstack * (2 * m + merger_linears)  # LayerNorm after the shuffle
        vision = patch_embed + pos_embed + v.depth * block + merger + deepstack
    return ParamCounts(
        lm_linears=s.num_layers * per_layer,
        lm_norms=norms,
        embed_tokens=embed,
        lm_head=0 if s.tie_word_embeddings else embed,
        vision=vision,
    )


def count_parameters_meta(config: Any) -> ParamCounts:
    """The same counts by instantiating the family's model on the meta device (no memory,
    a few seconds for the 32B shape): the ground truth the arithmetic is tested against."""
    import torch

    from pcbvlm.families import FAMILIES

    family = FAMILIES.get(getattr(config, "model_type", ""))
    if family is None or not hasattr(config, "to_dict"):
        raise TypeError(
            f"count_parameters_meta needs a transformers config of a model family, got {type(config).__name__}"
        )
    with torch.device("meta"):
        model = family.model_class()(config)
    parts = {"lm_linears": 0, "lm_norms": 0, "embed_tokens": 0, "lm_head": 0, "vision": 0}
    for name, param in model.named_parameters():
        n = param.numel()
        if name.startswith("model.visual."):
            parts["vision"] += n
        elif name.startswith("lm_head."):
            parts["lm_head"] += n
        elif name.startswith("model.language_model.embed_tokens."):
            parts["embed_tokens"] += n
        elif re.search(r"\.(self_attn|mlp)\.\w+_proj\.", name):
            parts["lm_linears"] += n
        else:
            parts["lm_norms"] += n
    return ParamCounts(**parts)
