"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), v0.1 with
AlexNet: the distance the `lpips` package computes with `LPIPS(net='alex', version='0.1')`.

Both images go through AlexNet's convolutional features; at each of its five ReLUs the features are normalised
to unit length over channels, their squared difference is weighted per channel by a learned 1x1 convolution
(the "linear heads"), averaged over space, and the five layers are summed.

Weights, brought by the user (nothing is downloaded):
  * `features.*`: torchvision's ImageNet AlexNet, alexnet-owt-7be5be79.pth (its `classifier.*` is not used);
  * `lin0.model.1.weight` ... `lin4.*`: the v0.1 heads, lpips/weights/v0.1/alex.pth inside the `lpips` wheel.
Module names follow those files, so loading is a plain state-dict load.
"""
import torch
import torch.nn as nn

CHANNELS = (64, 192, 384, 256, 256)   # AlexNet's five ReLU outputs
TAPS = (1, 4, 7, 9, 11)                # their indices in `features` (torchvision's numbering)
# lpips' ScalingLayer: maps [-1, 1] images to ImageNet statistics.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LinearHead(nn.Module):
    """One learned 1x1 conv to a single channel. lpips puts a Dropout at index 0 (training only), so the
    weight's key is `model.1.weight`; an Identity keeps that index."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


class LPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(   # torchvision's alexnet().features up to the last ReLU
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(),
        )
        for i, channels in enumerate(CHANNELS):
            self.add_module(f"lin{i}", LinearHead(channels))

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five ReLU outputs for images in [-1, 1], in the network's dtype."""
        x = x.to(self.features[0].weight.dtype)
        shift, scale = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) for v in (SHIFT, SCALE))
        x = (x - shift) / scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                out.append(x)
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distance per image pair, (N,), for (N, 3, H, W) images in [-1, 1].

        The heads run in float32 whatever the network's dtype: a ReLU output that is zero over all channels
        has norm 0, and lpips' epsilon 1e-10 would vanish in fp16 (0 / 0)."""
        distance = 0
        for i, (fa, fb) in enumerate(zip(self.taps(a), self.taps(b))):
            fa, fb = unit_length(fa.float()), unit_length(fb.float())
            head = getattr(self, f"lin{i}").model[1]
            distance = distance + nn.functional.conv2d((fa - fb) ** 2, head.weight.float()).mean((1, 2, 3))
        return distance


def unit_length(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """lpips.normalize_tensor: divide by the L2 norm over channels (eps added to the norm, as lpips does)."""
    return x / (x.pow(2).sum(1, keepdim=True).sqrt() + eps)
