"""Small timm architectures for the embedded offline dataset, registered in timm's registry.

They play the part ImageNet-21k backbones play in the paper: pre-trained (supervised, by
`ndbench pretrain`) on the embedded dataset's object-centric pool, which no scene uses.
"""

from __future__ import annotations

import torch
from timm.layers import Format, PatchEmbed, nchw_to
from timm.models import register_model
from timm.models._builder import build_model_with_cfg
from timm.models._registry import generate_default_cfgs
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

CNN_EMBEDDED = dict(block=BasicBlock, layers=(1, 1, 1, 1), channels=(32, 64, 128, 256), stem_width=32)
# The CNN's modules up to stride 8 (stem and two stages), in forward order.
CNN_STEM = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2")


class CNNStemPatchEmbed(PatchEmbed):
    """Hybrid patch embedding (the ViT paper's "hybrid", as timm's R50+ViT models): the
    embedded CNN's stem and first two stages (stride 8, 64 channels) turn the image into a
    grid with one cell per 8x8 patch, and a 1x1 convolution (`proj`) maps each cell to a token.
    Its attributes (patch size 8, grid) are those of a plain 8 px patchify."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if tuple(self.patch_size) != (8, 8):
            raise ValueError("the CNN stem has stride 8: use patch_size=8")
        cnn = ResNet(**CNN_EMBEDDED, num_classes=0)
        self.backbone = nn.Sequential(*(getattr(cnn, name) for name in CNN_STEM))
        self.proj = nn.Conv2d(CNN_EMBEDDED["channels"][1], self.proj.out_channels, kernel_size=1)

    def load_cnn_stem(self, cnn_state: dict[str, Tensor]) -> None:
        """Copy the stem and first two stages of an embedded CNN's state dict into `backbone`."""
        own = self.backbone.state_dict()
        names = dict(zip(CNN_STEM, map(str, range(len(CNN_STEM))), strict=True))
        mapped = {}
        for key in cnn_state:
            head, _, rest = key.partition(".")
            if head in names:
                mapped[f"{names[head]}.{rest}"] = cnn_state[key]
        missing = sorted(set(own) - set(mapped))
        if missing:
            raise ValueError(f"the CNN state dict lacks {missing[0]!r} ({len(missing)} stem tensors missing)")
        self.backbone.load_state_dict(mapped)

    def forward(self, x: Tensor) -> Tensor:
        # Channels-last convolutions and max pooling run ~1.7x faster on CPU here (oneDNN), which
        # makes a no-gradient ViT pass ~13 % faster; the outputs agree to float rounding. The
        # weights keep the default layout, so state dicts save as they always did.
        x = self.proj(self.backbone(x.contiguous(memory_format=torch.channels_last)))
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # NCHW -> NLC
        elif self.output_fmt != Format.NCHW:
            x = nchw_to(x, self.output_fmt)
        return self.norm(x)


# The ViT's blocks: width 128, depth 6, 4 heads on the 8x8 grid of a 64 px image. A plain
# 8 px patchify trained ~4x slower on the pre-training pool than this hybrid stem started from
# the CNN (test-instance accuracy 32 % vs 88 % after ~20k-30k images, methods/pretrain.py).
VIT_EMBEDDED = dict(img_size=64, patch_size=8, embed_dim=128, depth=6, num_heads=4, embed_layer=CNNStemPatchEmbed)

# Mean/std 0.5 as the paper's ImageNet-21k ViTs use; no hub files (weights come from pretrain).
default_cfgs = generate_default_cfgs(
    {
        name: {"input_size": (3, 64, 64), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
               "num_classes": 10, "url": "", "hf_hub_id": ""}
        for name in ("ndbench_vit_embedded", "ndbench_resnet_embedded")
    }
)


@register_model
def ndbench_vit_embedded(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Hybrid ViT for 64 px embedded scenes: the embedded CNN's stride-8 stem, then width 128,
    depth 6, 4 heads over 8x8 patch tokens."""
    if pretrained:
        raise RuntimeError("ndbench_vit_embedded has no hub weights; `ndbench pretrain` makes them")
    return build_model_with_cfg(VisionTransformer, "ndbench_vit_embedded", False, **{**VIT_EMBEDDED, **kwargs})


@register_model
def ndbench_resnet_embedded(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-10-style CNN (one basic block per stage) for 64 px embedded scenes."""
    if pretrained:
        raise RuntimeError("ndbench_resnet_embedded has no hub weights; `ndbench pretrain` makes them")
    return build_model_with_cfg(ResNet, "ndbench_resnet_embedded", False, **{**CNN_EMBEDDED, **kwargs})
