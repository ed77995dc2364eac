"""Hugging Face ``transformers`` classes for every family: a config, a ``PreTrainedModel`` with ``GenerationMixin``
and a ``Cache`` that carries the family's own decoding state.

Importing this module registers each family with ``AutoConfig`` and ``AutoModelForCausalLM`` (model types
``nlplatform-<family>``); ``import nlplatform`` never imports it, so the command line does not load ``transformers``.
An exported folder (``nlplatform export``) also names these classes in its ``auto_map``, so
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` works in a process that has not imported
``nlplatform``: the folder's ``hf_nlplatform.py`` imports this module.

The model is our own module under ``model.`` (the same weights and the same forward as in the platform):

- ``forward(input_ids)`` without a cache is the family's full forward (HOPE learns in context as it reads, unless
  ``test_time_learning`` is off in the config);
- ``generate()`` keeps a ``StateCache``: the KV cache of attention, the recurrent memories of the others, HOPE's
  memories, conv caches and in-context CMS weights. The prompt goes in one ``step``, then one token per step, as
  ``nlplatform generate`` does. Padded batches are refused: a recurrent state cannot skip padding.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, Cache, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from nlplatform import registry

__all__ = ["CONFIGS", "MODELS", "NLPlatformConfig", "NLPlatformForCausalLM", "StateCache", "classes_for"]  # + below


class NLPlatformConfig(PreTrainedConfig):
    """A family's model config as ``transformers`` keeps it: ``model`` holds the fields of the family's own config
    dataclass (``registry.config_from_fields`` rebuilds it), ``recipe`` the training recipe with its
    secrets masked (what ``nlplatform eval`` needs of the data), ``tokenizer`` how to reload the tokenizer
    (``bytes`` or ``file``: the folder's ``tokenizer.json``)."""

    model_type = "nlplatform"
    family: ClassVar[str] = ""  # set by each family's subclass

    model: dict | None = None
    recipe: dict | None = None
    tokenizer: str = "bytes"
    test_time_learning: bool = True  # HOPE: the in-context CMS levels learn while reading (false freezes them)
    max_position_embeddings: int = 2048  # the training window: what lm-eval's hf backend truncates contexts to
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True
    model_format: int = 1  # the family's format version the weights were trained under (``registry``)
    training: dict | None = None  # step, tokens seen, val ppl, MLflow run id of the exported checkpoint

    def __post_init__(self, **kwargs: Any) -> None:
        self.model, self.recipe = dict(self.model or {}), dict(self.recipe or {})
        self.vocab_size = self.model.get("vocab_size")
        self.hidden_size = self.model.get("d_model")
        self.num_hidden_layers = self.model.get("n_layers")
        self.tie_word_embeddings = bool(self.model.get("tie_embeddings", False))
        super().__post_init__(**kwargs)

    def model_config(self):
        """The family's own config dataclass."""
        return registry.config_from_fields({**self.model, "name": self.family})


class StateCache(Cache):
    """A family's decoding state behind ``transformers``' cache interface: ``state`` is what the model's
    ``init_state`` made and ``step`` advances (a KV cache for attention, a constant-size state for the others)."""

    is_compileable = False

    def __init__(self, state: Any) -> None:
        super().__init__(layers=[])
        self.state = state
        self.seen = 0  # tokens the state holds

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    @staticmethod
    def _refuse(*_: Any, **__: Any):
        raise NotImplementedError(
            "nlplatform models keep one state per sequence and cannot reorder, crop or split it: use greedy or "
            "sampled decoding (no beam search, assisted or contrastive generation)"
        )

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _refuse


class NLPlatformForCausalLM(PreTrainedModel, GenerationMixin):
    """Any family as a ``transformers`` causal LM; ``self.model`` is the platform's module."""

    config_class = NLPlatformConfig
    base_model_prefix = "model"

    def __init__(self, config: NLPlatformConfig) -> None:
        super().__init__(config)
        self.model = registry.build_model(config.model_config())
        if hasattr(self.model, "set_test_time_learning"):
            self.model.set_test_time_learning(config.test_time_learning)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """The platform's modules initialise themselves when built; loading replaces every weight."""

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.tok_emb

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is the family's own state (``_prepare_cache_for_generation``)

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
    ) -> None:
        """A fresh ``StateCache`` for ``batch_size`` sequences of up to ``max_cache_length`` tokens."""
        if generation_mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
            StateCache._refuse()
        if model_kwargs.get("past_key_values") is not None or generation_config.use_cache is False:
            return
        param = next(self.parameters())
        state = self.model.init_state(batch_size, max_cache_length, param.device, param.dtype)
        model_kwargs["past_key_values"] = StateCache(state)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        past_key_values: StateCache | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Only the tokens the state has not read yet (the prompt first, then each new token)."""
        _check_unpadded(attention_mask)
        seen = 0 if past_key_values is None else past_key_values.get_seq_length()
        return {"input_ids": input_ids[:, seen:], "past_key_values": past_key_values, "use_cache": True}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: StateCache | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **_: Any,  # position ids, cache positions, ...: positions follow from the state
    ) -> CausalLMOutputWithPast:
        """Logits [B, T, V] of ``input_ids`` after the tokens ``past_key_values`` holds (its state advances in
        place); without a cache, the full forward. ``labels`` (-100 ignored) give the mean next-token loss."""
        _check_unpadded(attention_mask)
        if past_key_values is not None:
            logits, past_key_values.state = self.model.step(input_ids, past_key_values.state)
            past_key_values.seen += input_ids.shape[1]
        else:
            logits = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)


def _check_unpadded(attention_mask: torch.Tensor | None) -> None:
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "nlplatform models read every position of their input: a padded batch (attention_mask with zeros) is not "
            "supported; run sequences of different lengths one at a time"
        )


def _camel(family: str) -> str:
    return {"transformer": "TransformerPP", "deltanet": "DeltaNet", "gated_deltanet": "GatedDeltaNet"}.get(
        family, family.title()
    )


# One config and one model class per family, so a folder's config.json names its architecture (HopeForCausalLM,
# model type nlplatform-hope) and the Auto classes map each model type to its class.
CONFIGS: dict[str, type[NLPlatformConfig]] = {}
MODELS: dict[str, type[NLPlatformForCausalLM]] = {}
for _family in registry.FAMILIES:
    _config = type(
        f"{_camel(_family)}Config",
        (NLPlatformConfig,),
        {"model_type": f"nlplatform-{_family}", "family": _family, "__module__": __name__},
    )
    _model = type(
        f"{_camel(_family)}ForCausalLM", (NLPlatformForCausalLM,), {"config_class": _config, "__module__": __name__}
    )
    CONFIGS[_family], MODELS[_family] = _config, _model
    globals()[_config.__name__], globals()[_model.__name__] = _config, _model
    __all__ += [_config.__name__, _model.__name__]
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForCausalLM.register(_config, _model, exist_ok=True)


def classes_for(family: str) -> tuple[type[NLPlatformConfig], type[NLPlatformForCausalLM]]:
    """The config and model classes of ``family``."""
    return CONFIGS[family], MODELS[family]
