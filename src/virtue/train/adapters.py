"""What trains: DoRA/LoRA adapters on the LLM (via peft), the connector, optionally more; freezing the rest;
merging adapters back for export."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from virtue.errors import ConfigError
from virtue.model.embedder import VirtueModel

# The official targets (virtue-spec §3): in Qwen2-VL they hit the LLM's q/k/v/o and down projections.
OFFICIAL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")


@dataclass(frozen=True)
class TrainableConfig:
    """Attributes:
    lora: add LoRA (DoRA if `use_dora`) adapters to the LLM's `lora_targets`; the LLM base stays frozen.
    llm: train every LLM weight instead (from-scratch or full fine-tuning); excludes `lora`.
    embeddings: also train the token embedding table (frozen by default, as officially; its 151,936 rows
        make every step's gradient and optimiser update dense and slow).
    connector / vision / sam: train the connector, the Qwen ViT + merger, the SAM2 branch.
    """

    lora: bool = True
    lora_r: int = 8
    lora_alpha: int = 64
    lora_dropout: float = 0.1
    use_dora: bool = True
    lora_targets: tuple[str, ...] = OFFICIAL_TARGETS
    llm: bool = False
    embeddings: bool = False
    connector: bool = True
    vision: bool = False
    sam: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.lora and self.llm:
            raise ConfigError("trainable: 'lora' and 'llm' exclude each other (adapters on a trained base)")
        if self.lora_r < 1 or not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"trainable: need lora_r >= 1 and 0 <= lora_dropout < 1, got {self.lora_r}, "
                              f"{self.lora_dropout}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))


def apply_trainable(model: VirtueModel, cfg: TrainableConfig) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze/add what `cfg` trains. Returns the trainable parameters."""
    model.requires_grad_(False)
    if cfg.lora:
        from peft import LoraConfig, LoraModel

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_targets),
            use_dora=cfg.use_dora,
            init_lora_weights="gaussian",
        )
        model.qwen.language_model = LoraModel(model.qwen.language_model, lora, "default")
    if cfg.llm:
        model.qwen.language_model.requires_grad_(True)
    model.qwen.language_model.get_input_embeddings().requires_grad_(cfg.embeddings)
    if cfg.vision:
        model.qwen.visual.requires_grad_(True)
    if model.connector is not None and cfg.connector:
        model.connector.requires_grad_(True)
    if model.sam is not None and cfg.sam:
        model.sam.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def has_adapters(model: VirtueModel) -> bool:
    from peft import LoraModel

    return isinstance(model.qwen.language_model, LoraModel)


def merge_adapters(model: VirtueModel) -> VirtueModel:
    """Fold the adapters into the base weights (DoRA included) so the model saves in the library layout."""
    if has_adapters(model):
        model.qwen.language_model = model.qwen.language_model.merge_and_unload()
    return model
