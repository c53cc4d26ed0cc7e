"""The four ELLA nodes (V3 schema). Each resolves its inputs, calls ella_core / the hook, and returns."""

from __future__ import annotations

import logging
import os

import torch

import comfy.model_management as mm
import folder_paths
from comfy_api.latest import io

from ..ella_core import load_ella_with_metadata
from ..ella_core.conditioning import EllaPrompt, check_context_width
from ..ella_core.encoding_settings import settings_for_connector
from ..ella_core.llm_loading import set_fallback_t5_tokenizer
from ..ella_core import prompt_weights
from ..ella_core.text_encoder import check_width, load_text_encoder
from . import folders, hook, validation
from .managed import DTYPE_WIDGET, ManagedConnector, ManagedTextEncoder, text_encoder_precision

log = logging.getLogger(__name__)
ELLAType = io.Custom("ELLA_TSC_CONNECTOR")
TextEncoderType = io.Custom("ELLA_TSC_TEXT_ENCODER")
CATEGORY = "conditioning/ella"
DTYPES = DTYPE_WIDGET  # default, then ella_core.dtypes' names (fp16, bf16, fp32, fp8_e4m3fn, fp8_e5m2)
# Single-file T5 encoders with no tokenizer beside them use the T5 tokenizer ComfyUI ships.
COMFY_T5_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(mm.__file__)), "text_encoders", "t5_tokenizer")
set_fallback_t5_tokenizer(COMFY_T5_TOKENIZER)  # also for the token-count route


def _model_context_dim(model) -> int | None:
    return hook._model_context_dim(model.model)


class EllaTSCConnectorLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EllaTSCConnectorLoader",
            display_name="Load ELLA Connector",
            category=CATEGORY,
            description="Loads an ELLA connector (TSC), which turns LLM prompt features into the UNet's "
                        "cross-attention context at every sampling step.",
            inputs=[io.Combo.Input("ella_name", options=folder_paths.get_filename_list(folders.ELLA_FOLDER),
                                   tooltip="Connector file in models/ella (or an `ella` path in extra_model_paths.yaml).")],
            outputs=[ELLAType.Output(display_name="ELLA", tooltip="The connector, managed with the UNet.")],
        )

    @classmethod
    def validate_inputs(cls, ella_name=None) -> bool | str:
        """At queue time: the file exists in an `ella` folder and its header describes a connector."""
        return validation.verdict(validation.connector_problem(ella_name))

    @classmethod
    def execute(cls, ella_name: str) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(folders.ELLA_FOLDER, ella_name)
        device = mm.get_torch_device()
        dtype = torch.float32 if device.type == "cpu" or not mm.should_use_fp16(device) else torch.float16
        module, metadata = load_ella_with_metadata(path, device=mm.unet_offload_device(), dtype=dtype)
        return io.NodeOutput(ManagedConnector.create(module, metadata, ella_name))


class EllaTSCTextEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EllaTSCTextEncoderLoader",
            display_name="Load ELLA Text Encoder (T5 / LLM)",
            category=CATEGORY,
            description="Loads the LLM (T5, Llama, ...) whose features an ELLA connector reads; ComfyUI "
                        "moves it to the GPU only while encoding.",
            inputs=[
                io.Combo.Input("model_name", options=folders.list_text_encoders(),
                               tooltip="HF model folder (with config.json), .gguf, .safetensors with a tokenizer "
                                       "folder beside it, or a single T5 encoder .safetensors (uses ComfyUI's T5 "
                                       "tokenizer), in models/text_encoders, models/LLM or models/ella_encoder."),
                io.Combo.Input("dtype", options=list(DTYPES), default="default",
                               tooltip="Weights dtype. default: ComfyUI's --*-text-enc flag if given, else fp16 "
                                       "(T5; ELLA's T5 was trained in fp16) or bf16 (other LLMs) on GPU, fp32 on "
                                       "CPU. fp8: Linear weights stored in fp8, computed in fp16/bf16."),
                io.Combo.Input("device", options=["auto", "cpu", "gpu"], default="auto",
                               tooltip="auto: ComfyUI's text-encoder device; cpu keeps the LLM off the GPU entirely."),
                io.Combo.Input("token_mode", options=["fixed", "flexible"], default="fixed",
                               tooltip="fixed: pad/truncate to max_length as in training; flexible: no padding."),
                io.Int.Input("max_length", default=128, min=1, max=4096,
                             tooltip="Token length (fixed mode: pad and truncate to it) or truncation limit "
                                     "(flexible mode: shorter prompts keep their length, longer ones are cut)."),
            ],
            outputs=[TextEncoderType.Output(display_name="TEXT_ENCODER", tooltip="The managed LLM encoder.")],
        )

    @classmethod
    def validate_inputs(cls, model_name=None, dtype=None, device=None, token_mode=None, max_length=None) -> bool | str:
        """At queue time: the encoder exists (a .gguf is complete), combos hold listed values, max_length fits."""
        values = {"dtype": dtype, "device": device, "token_mode": token_mode, "max_length": max_length}
        return validation.verdict(validation.text_encoder_problem(model_name),
                                  *validation.widget_problems(cls, values))

    @classmethod
    def execute(cls, model_name: str, dtype: str, device: str, token_mode: str, max_length: int) -> io.NodeOutput:
        path = folders.resolve_text_encoder(model_name)
        if device == "cpu":
            load_device = offload_device = torch.device("cpu")
        elif device == "gpu":
            load_device, offload_device = mm.get_torch_device(), mm.text_encoder_offload_device()
        else:
            load_device, offload_device = mm.text_encoder_device(), mm.text_encoder_offload_device()
        precision = text_encoder_precision(dtype, load_device)  # the widget, else ComfyUI's --*-text-enc flag
        encoder = load_text_encoder(path, dtype=precision, device=offload_device,  # finds a tokenizer beside files
                                    fallback_t5_tokenizer=COMFY_T5_TOKENIZER)
        return io.NodeOutput(ManagedTextEncoder.create(encoder, model_name, load_device, offload_device,
                                                       token_mode, max_length))


class EllaTSCEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EllaTSCEncode",
            display_name="ELLA Prompt Encode",
            category=CATEGORY,
            description="Encodes a prompt with the LLM into an ordinary CONDITIONING whose context the ELLA "
                        "connector recomputes at every sampling step (needs ELLA Timestep Conditioning on the MODEL).",
            inputs=[
                TextEncoderType.Input("text_encoder", tooltip="From Load ELLA Text Encoder."),
                ELLAType.Input("ella", tooltip="From Load ELLA Connector: the connector that reads these features."),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                tooltip="The prompt, in natural language. (word:1.2) weights: see weighting."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional CLIP: its tokens for the same text are appended after ELLA's "
                                      "(keeps LoRA trigger words and styles)."),
                io.Float.Input("clip_weight", default=1.0, min=0.0, max=10.0, step=0.05, optional=True,
                               tooltip="Scale of the appended CLIP tokens (only used with clip)."),
                io.Combo.Input("weighting", options=list(prompt_weights.MODES), default=prompt_weights.DEFAULT_MODE,
                               optional=True,
                               tooltip="(word:1.2) in the prompt. strip: removed before the LLM, no effect (the "
                                       "reference pack's behaviour). connector attention: ComfyUI's weight syntax "
                                       "scales those words' attention inside the connector."),
            ],
            outputs=[io.Conditioning.Output(tooltip="Use like any CONDITIONING (KSampler, Combine, area, ControlNet).")],
        )

    @classmethod
    def validate_inputs(cls, text=None, weighting=None) -> bool | str:
        """At queue time: the prompt is valid text (a lone surrogate from a broken client is named), and its
        weights can be applied when weighting acts."""
        return validation.verdict(validation.prompt_problem(text),
                                  *validation.widget_problems(cls, {"weighting": weighting}),
                                  validation.weights_problem(text, weighting))

    @classmethod
    def execute(cls, text_encoder: ManagedTextEncoder, ella: ManagedConnector, text: str, clip=None,
                clip_weight: float = 1.0, weighting: str | None = None) -> io.NodeOutput:
        check_width(text_encoder.hidden_size, ella.module.config.input_dim, f"'{text_encoder.name}'",
                        f"ELLA connector '{ella.name}'")
        settings, notes = settings_for_connector(ella.metadata, text_encoder.settings, f"ELLA connector '{ella.name}'",
                                                 f"text encoder '{text_encoder.name}'")
        for note in notes:
            log.warning("ELLA Prompt Encode: %s", note)
        encoder_text, weighted = prompt_weights.prepare(text, weighting)
        for note in weighted.notes if weighted is not None else ():
            log.warning("ELLA Prompt Encode: %s", note)
        features = text_encoder.encode(encoder_text, settings)  # (1, L, D_llm)
        bias = prompt_weights.bias_for(weighted, text_encoder.encoder.tokenizer, features.shape[1],
                                       mode=settings.mode, max_length=settings.max_length)  # None: unweighted
        clip_tokens = clip_pooled = None
        if clip is not None:
            clip_tokens, clip_pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
            if clip_tokens.shape[-1] != ella.module.config.width:
                raise ValueError(f"ELLA Prompt Encode: CLIP tokens have width {clip_tokens.shape[-1]} but connector "
                                 f"'{ella.name}' outputs width {ella.module.config.width}; use the CLIP of the same base model.")
        prompt = EllaPrompt(features=features, connector=ella, text=text, clip_tokens=clip_tokens,
                            clip_weight=clip_weight, clip_pooled=clip_pooled, name=f"ELLA connector '{ella.name}'",
                            text_bias=bias)
        # Placeholder of the context's shape: the hook replaces it at every model call.
        tokens = ella.module.config.num_latents + (clip_tokens.shape[1] if clip_tokens is not None else 0)
        placeholder = torch.zeros(1, tokens, ella.module.config.width)
        options = {"model_conds": {hook.COND_KEY: hook.ELLACond(prompt)}}  # the hook's connector runs
        pooled_dim = ella.module.config.pooled_dim
        if pooled_dim is not None:
            options["pooled_output"] = torch.zeros(1, pooled_dim)  # replaced per step by the pooled head
        elif clip_pooled is not None:
            options["pooled_output"] = clip_pooled
        return io.NodeOutput([[placeholder, options]])


class EllaTSCTimestepConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EllaTSCTimestepConditioning",
            display_name="ELLA Timestep Conditioning",
            category=CATEGORY,
            description="Patches the MODEL so every ELLA conditioning gets the connector's context for the exact "
                        "timestep of each model call (any sampler, scheduler, denoise); plain conditionings pass through.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to sample with."),
                ELLAType.Input("ella", tooltip="The connector; it is loaded and offloaded together with the model."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="A patched clone; the input model is unchanged.")],
        )

    @classmethod
    def execute(cls, model, ella: ManagedConnector) -> io.NodeOutput:
        check_context_width(ella.module, _model_context_dim(model), f"ELLA connector '{ella.name}'",
                            "the diffusion model")
        ella = ella.for_dtype(hook.connector_dtype(model))  # this connector runs, in the UNet's compute dtype
        return io.NodeOutput(hook.patch_model(model, ella.patcher, ella))


NODES = [EllaTSCConnectorLoader, EllaTSCTextEncoderLoader, EllaTSCEncode, EllaTSCTimestepConditioning]
