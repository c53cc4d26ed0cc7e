"""ComfyUI imported into the test process (CPU), the pack loaded by path like ComfyUI loads it, and a
recorder of every UNet call, for exactness tests that need many sampler/scheduler/graph variations fast."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from devtools import comfy_env
from devtools import tiny_models as tm

REPO_ROOT = comfy_env.REPO_ROOT
PACK_MODULE = "ella_pack_under_test"


def load_pack():
    """The repository imported as a ComfyUI custom-node package (relative imports work as in ComfyUI)."""
    return comfy_env.load_pack(PACK_MODULE)


@dataclass
class Recorder:
    """DIFFUSION_MODEL wrapper keeping (t, context, cond_or_uncond, sigma) of every UNet call."""

    calls: list = field(default_factory=list)

    def __call__(self, executor, x, timesteps, context, *args, **kwargs):
        topts = args[2] if len(args) > 2 else kwargs.get("transformer_options", {})
        self.calls.append({"t": timesteps.detach().float().clone(), "context": context.detach().float().clone(),
                           "sigma": topts["sigmas"].detach().clone(),
                           "cond_or_uncond": list(topts.get("cond_or_uncond", [])),
                           "y": None if not args or args[0] is None else args[0].detach().float().clone()})
        return executor(x, timesteps, context, *args, **kwargs)


@dataclass
class Env:
    """Everything an in-process test needs: pack modules, loaded models, node classes."""

    pack: object
    model: object  # ModelPatcher of the tiny SD1.5 UNet
    clip: object
    vae: object
    connector: object  # ManagedConnector
    text_encoder: object  # ManagedTextEncoder
    nodes: object  # the pack's nodes.ella_nodes module
    hook: object  # the pack's nodes.hook module

    def encode(self, text: str, clip=None, clip_weight: float = 1.0):
        return self.nodes.EllaTSCEncode.execute(self.text_encoder, self.connector, text, clip=clip,
                                             clip_weight=clip_weight).result[0]

    def features(self, text: str) -> torch.Tensor:
        """Features computed independently of the node's cache: (1, L, D)."""
        enc = self.text_encoder
        return enc.encoder.encode([text], mode=enc.mode, max_length=enc.max_length).features

    def reference(self, text: str):
        module, feats = self.connector.module, self.features(text)
        return lambda t: module(feats.expand(t.shape[0], -1, -1), t.float()).detach()

    def patched(self, model=None):
        """ELLA Timestep Conditioning applied, plus a fresh Recorder (returned)."""
        m = self.nodes.EllaTSCTimestepConditioning.execute(model or self.model, self.connector).result[0]
        rec = Recorder()
        m.add_wrapper_with_key("diffusion_model", "test_recorder", rec)
        return m, rec


def tiny_sdxl_model(seed: int = 0):
    """A small SDXL-class model (context 2048, adm 2816 with the pooled text first) built in-process:
    SDXL's real widths cannot be shrunk through checkpoint detection, so the config is given directly."""
    tm.import_comfy()
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = dict(model_channels=64, use_linear_in_transformer=True, transformer_depth=[1],
                       transformer_depth_output=[1, 1], transformer_depth_middle=1, context_dim=2048,
                       adm_in_channels=2816, use_temporal_attention=False, in_channels=4, out_channels=4,
                       num_res_blocks=[1], channel_mult=[1], image_size=32, use_spatial_transformer=True,
                       legacy=False, num_classes="sequential", num_head_channels=32)
    config = comfy.supported_models.SDXL(unet_config)
    model = config.get_model({})
    gen = torch.Generator().manual_seed(seed)
    state = {k: tm.random_like(k, v.shape, gen) for k, v in model.diffusion_model.state_dict().items()}
    model.diffusion_model.load_state_dict(state)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def make_env(base: Path) -> Env:
    tm.import_comfy()
    import comfy.sd
    import folder_paths

    models = base / "models"
    for folder, sub in (("ella", "ella"), ("text_encoders", "text_encoders"), ("checkpoints", "checkpoints")):
        folder_paths.add_model_folder_path(folder, str(models / sub), is_default=True)
    pack = load_pack()
    nodes = sys.modules[f"{PACK_MODULE}.nodes.ella_nodes"]
    hook = sys.modules[f"{PACK_MODULE}.nodes.hook"]
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(models / "checkpoints" / tm.CHECKPOINT_NAME),
                                                                output_vae=True, output_clip=True)
    connector = nodes.EllaTSCConnectorLoader.execute(tm.ELLA_NAME).result[0]
    text_encoder = nodes.EllaTSCTextEncoderLoader.execute(tm.T5_NAME, "fp32", "cpu", "fixed", 16).result[0]
    return Env(pack, model, clip, vae, connector, text_encoder, nodes, hook)


def sample(model, positive, negative, *, sampler="euler", scheduler="normal", steps=3, cfg=5.0, batch=1,
           denoise=1.0, latent=None, sigmas=None, seed=0):
    """One KSampler-equivalent run (or SamplerCustom with explicit sigmas) -> latent samples."""
    import comfy.sample
    import comfy.samplers

    latent = torch.zeros(batch, 4, 8, 8) if latent is None else latent
    noise = comfy.sample.prepare_noise(latent, seed)
    if sigmas is not None:
        return comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.sampler_object(sampler), sigmas,
                                          positive, negative, latent, seed=seed, disable_pbar=True)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               denoise=denoise, seed=seed, disable_pbar=True)
